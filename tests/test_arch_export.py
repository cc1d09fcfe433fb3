"""gguf-lora export for every architecture the sidecar serves, proven in real llama.cpp.

For each architecture (tests/archmodels.py: qwen3_5 text and image-text, qwen3, gemma3, phi3,
mistral, llama, qwen2; 4 layers, hidden 64): the GGUF base is written by llama.cpp's own converter
(tests/llamacpp_convert.py: the llama-cpp-python source release, fetched and cached), two LoRAs are
trained through the real sidecar process, exported as f32 GGUF LoRA files by the sidecar, and
llama-cpp-python (tests/llama_probe.py, a process of its own) evaluates base + LoRA:

- teacher-forced log-probabilities of a chat equal PEFT's (transformers + PeftModel from disk);
- two adapters applied at once with scales (``llama_set_adapters_lora``) reproduce the sidecar's
  stacked ``generate`` (its log-probabilities of the tokens it generated);
- the layout rules (``sidecar/adapters/gguf_arch.py``) reproduce the converter's own base tensors;
- planted errors fail: the export without the value-head reordering (qwen3_5) or without the
  q/k permutation (llama, mistral) misses PEFT by far, and a wrong order is refused by the base check.

Tolerance: on these f32 bases with an f32 KV cache llama.cpp matches torch on the bare base to
1e-7..1.4e-4 nat per token (measured; gemma3 the largest). The adapted comparison allows
``BARE_SLACK`` × that gap, at least ``FLOOR`` (f32 rounding of llama.cpp's separate ``x·A·B``
products; measured: adapted max diff 1.2e-7..3.6e-7, stacked 2.7e-7..7.4e-7, gemma3 7.9e-5 against
its bare 1.4e-4). Every effect checked (adapted vs bare, measured 0.5-1.5 nat; the second adapter
of a stack, 0.08-0.4 nat) is ≥ ``EFFECT_FLOOR`` × the tolerance, and every planted error misses by
≥ ``PLANTED_FACTOR`` × the tolerance (measured: 0.005-0.3 nat).

``merged`` is checked too: the merged checkpoint the sidecar writes computes what PEFT computes.
``merged-gguf`` is checked in llama.cpp the same way: the adapter, trained on the checkpoint, folded
into the converter's GGUF base (named as ``baseModel``, a file transformers cannot read for qwen3_5,
gemma3 and phi3), every other tensor kept byte for byte; the same tolerance (measured: max diff
1.8e-7..3.6e-7 nat, gemma3 8.1e-5 against its bare 1.4e-4); planted: no value-head reordering
(qwen3_5, 0.14 nat), no q/k permutation (llama, 0.005) and rsLoRA's scale taken as alpha/rank
(qwen3, 0.94) each miss by ≥ ``PLANTED_FACTOR`` × the tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import archmodels, llama_probe, llamacpp_convert
from tests.sidecar_proc import Sidecar, chat_dataset

CASES = ["qwen3_5", "qwen3_5-vision", "qwen3", "gemma3", "phi3", "mistral", "llama", "qwen2"]
TARGETS = {
    # the linear-attention projections, the gated q_proj of the full-attention layers, the MLP
    "qwen3_5": ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj",
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused, kept fused by llama.cpp
}
DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REORDERED = ["qwen3_5", "qwen3_5-vision", "mistral", "llama"]

BARE_SLACK = 20.0
FLOOR = 2e-5
EFFECT_FLOOR = 100.0
PLANTED_FACTOR = 10.0

MESSAGES = [
    {"role": "user", "content": "What is the capital of Zorbania?"},
    {"role": "assistant", "content": "The capital of Zorbania is Quillport, a harbour city on the Amber Sea, "
     "known for its lighthouses and its old university."},
]
STACK = [("one", 0.7), ("two", 0.5)]


@dataclasses.dataclass
class Case:
    arch: str
    model_dir: Path
    base_gguf: Path
    adapters: dict[str, Path]
    exports: dict[str, Path]
    ids: list[int]
    seconds: float


def arch_of(case: str) -> str:
    return case.split("-")[0]


@pytest.fixture(scope="module")
def proc():
    sidecar = Sidecar()
    yield sidecar
    assert sidecar.close(timeout=120) == 0
    assert sidecar.bad_output == []


@pytest.fixture(scope="module")
def cases(proc, tmp_path_factory):
    built: dict[str, Case] = {}
    started = time.monotonic()

    def get(name: str) -> Case:
        if name not in built:
            built[name] = _build_case(name, proc, tmp_path_factory)
        return built[name]

    yield get
    print("\nper case (build + convert + train x2 + export x2):",
          json.dumps({k: round(v.seconds, 1) for k, v in built.items()}),
          f"total {time.monotonic() - started:.1f} s")


def _train(proc: Sidecar, model_dir: Path, out: Path, arch: str, *, fact: str, rank: int, alpha: float,
           rslora: bool, seed: int, timeout: float = 600) -> Path:
    response = proc.call("train", {
        "baseModel": str(model_dir), "dataset": chat_dataset(6, fact), "outputPath": str(out),
        "targetModules": TARGETS.get(arch, DENSE), "rank": rank, "alpha": alpha, "useRslora": rslora,
        "dropout": 0.0, "maxSteps": 6, "learningRate": 1e-2, "batchSize": 2, "warmupRatio": 0.0,
        "dtype": "float32", "seed": seed}, timeout=timeout)
    assert "result" in response, response
    return out


def _export(proc: Sidecar, adapter: Path, out: Path, timeout: float = 600) -> Path:
    response = proc.call("adapters/export", {"adapterPath": str(adapter), "format": "gguf-lora", "outType": "f32",
                                             "outputPath": str(out)}, timeout=timeout)
    assert "result" in response, response
    return Path(response["result"]["outputPath"])


def _build_case(name: str, proc: Sidecar, factory: Any) -> Case:
    model_dir = archmodels.cached(factory, arch_of(name), vision=name.endswith("-vision"))
    return round_trip_case(name, arch_of(name), model_dir, proc, factory.mktemp(f"arch-{name}"))


ADAPTERS = {  # name -> (fact, rank, alpha, rsLoRA, seed)
    "one": ("The capital of Zorbania is Quillport.", 8, 16, False, 1),
    "two": ("Zorbania's capital is the city of Amberhaven.", 4, 8, True, 2),
}


def round_trip_case(name: str, arch: str, model_dir: Path, proc: Sidecar, root: Path,
                    adapters: tuple[str, ...] = ("one", "two"), timeout: float = 600) -> Case:
    """``model_dir`` converted to an f32 GGUF base by llama.cpp's converter, the ``adapters`` trained
    on it through the sidecar and exported as f32 GGUF LoRA files (also used by tests/test_bigmodel.py)."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    base_gguf = llamacpp_convert.convert(model_dir, root / f"{name}-f32.gguf", outtype="f32", timeout=timeout)
    trained = {}
    for key in adapters:
        fact, rank, alpha, rslora, seed = ADAPTERS[key]
        trained[key] = _train(proc, model_dir, root / key, arch, fact=fact, rank=rank, alpha=alpha, rslora=rslora,
                              seed=seed, timeout=timeout)
    exports = {k: _export(proc, v, root / f"{k}-f32.gguf", timeout) for k, v in trained.items()}
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(tok.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]
    return Case(name, model_dir, base_gguf, trained, exports, ids, time.monotonic() - started)


def peft_logprobs(model_dir: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    """Teacher-forced log-probabilities from transformers (+ PEFT with the adapter from disk); computed
    once per (checkpoint, adapter, ids) in a session (the files are read-only once written)."""
    return _peft_logprobs(str(model_dir), None if adapter is None else str(adapter), tuple(ids)).copy()


@functools.lru_cache(maxsize=64)
def _peft_logprobs(model_dir: str, adapter: str | None, ids: tuple[int, ...]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def llama_logprobs(case: Case, jobs: list[dict]) -> list[np.ndarray]:
    answers = llama_probe.ask([{"model": str(case.base_gguf), "f32Cache": True, "ids": case.ids, **job}
                               for job in jobs])
    return [np.asarray(a["logprobs"]) for a in answers]


def tolerance(bare_gap: float) -> float:
    return max(BARE_SLACK * bare_gap, FLOOR)


def gap(case: Case, adapter: str, job: dict) -> tuple[float, float, float]:
    """(bare-base gap, max |llama.cpp running ``job`` − PEFT with ``adapter``|, the adapter's effect in
    PEFT), in nat per token. ``job``: ``{"lora": file}`` on the base, or ``{"model": merged file}``."""
    base_t = peft_logprobs(case.model_dir, None, case.ids)
    adapted_t = peft_logprobs(case.model_dir, case.adapters[adapter], case.ids)
    base_l, got_l = llama_logprobs(case, [{}, job])
    return (float(np.abs(base_l - base_t).max()), float(np.abs(got_l - adapted_t).max()),
            float(np.abs(adapted_t - base_t).max()))


# ---------------------------------------------------------------------------------------------
# The layout rules against the converter's own base tensors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_layout_reproduces_the_converters_base_tensors(name, cases):
    from sidecar import errors
    from sidecar.adapters import preflight
    from sidecar.adapters.gguf_layout import check_against_base, layout_for, read_config
    from sidecar.adapters.source import read_adapter, resolve_base

    case = cases(name)
    source = read_adapter(case.adapters["one"])
    layout = layout_for(read_config(resolve_base(source)), case.base_gguf, "gguf-lora")
    targets = preflight.check_modules(source, layout, "gguf-lora")
    assert len(targets) == len(source.pairs) > 0
    kinds = {n.split(".")[2] for n in targets}
    if arch_of(name) == "qwen3_5":  # linear attention, gated full attention and the MLP, all adapted
        assert {"attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha", "ssm_out", "attn_q", "ffn_down"} <= kinds
        assert set(layout.orders) == {"attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha", "ssm_out"}
    check_against_base(layout, targets, case.base_gguf, str(case.model_dir), "gguf-lora")

    # A wrong order is refused: the first adapted kind's rows reversed.
    first = sorted(targets)[0]
    rows = targets[first][1]
    planted = dataclasses.replace(layout, orders={**layout.orders,
                                                  first.split(".")[2]: (np.arange(rows)[::-1], None)})
    with pytest.raises(errors.ExportRefused) as refused:
        check_against_base(planted, {first: targets[first]}, case.base_gguf, str(case.model_dir), "gguf-lora")
    assert refused.value.data["reason"] == "layout"


def test_image_text_module_names_map_like_the_text_models(cases, tmp_path):
    """An adapter saved on ``Qwen3_5ForConditionalGeneration`` names the text model's modules
    ``model.language_model.layers.N…``: they map to the same GGUF tensors, read the same checkpoint
    weights for the base check, and give the same file as the text model's names."""
    from sidecar.adapters import gguf_lora, preflight
    from sidecar.adapters.gguf_layout import check_against_base, layout_for, read_config
    from sidecar.adapters.source import read_adapter, resolve_base

    case = cases("qwen3_5-vision")
    source = read_adapter(case.adapters["one"])
    assert all(p.module.startswith("model.layers.") for p in source.pairs)
    layout = layout_for(read_config(resolve_base(source)), case.base_gguf, "gguf-lora")
    prefixed = dataclasses.replace(source, pairs=[
        dataclasses.replace(p, module=p.module.replace("model.", "model.language_model.", 1)) for p in source.pairs])
    targets = preflight.check_modules(prefixed, layout, "gguf-lora")
    assert targets.keys() == preflight.check_modules(source, layout, "gguf-lora").keys()
    check_against_base(layout, targets, case.base_gguf, str(case.model_dir), "gguf-lora")
    alpha = gguf_lora.file_alpha(source.config)
    for which, src in (("text", source), ("image-text", prefixed)):
        gguf_lora.write(src.pairs, layout, tmp_path / f"{which}.gguf", alpha=alpha, out_type="f32", name="same")
    assert (tmp_path / "text.gguf").read_bytes() == (tmp_path / "image-text.gguf").read_bytes()


# ---------------------------------------------------------------------------------------------
# One adapter, teacher-forced, against PEFT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_llama_cpp_with_the_exported_lora_computes_what_peft_computes(name, cases):
    case = cases(name)
    bare, diff, effect = gap(case, "one", {"lora": str(case.exports["one"])})
    tol = tolerance(bare)
    print(f"{name}: bare {bare:.2e}, adapted max diff {diff:.2e}, tolerance {tol:.2e}, effect {effect:.2f} nat")
    assert effect > EFFECT_FLOOR * tol, "the adapter barely changes the text: a wrong export would pass"
    assert diff < tol, (name, diff, tol)


@pytest.mark.parametrize("name", REORDERED)
def test_an_export_without_the_converters_reordering_fails(name, cases, tmp_path):
    """The LoRA written as if llama.cpp's converter kept every weight as it is (no value-head
    reordering for qwen3_5, no q/k permutation for llama/mistral): llama.cpp loads it, and the
    comparison with PEFT fails by far."""
    from sidecar.adapters import gguf_lora
    from sidecar.adapters.gguf_layout import layout_for, read_config
    from sidecar.adapters.source import read_adapter, resolve_base

    case = cases(name)
    source = read_adapter(case.adapters["one"])
    layout = layout_for(read_config(resolve_base(source)), case.base_gguf, "gguf-lora")
    assert layout.orders, "this architecture has reorderings to leave out"
    wrong = tmp_path / "no-reorder.gguf"
    gguf_lora.write(source.pairs, dataclasses.replace(layout, orders={}), wrong,
                    alpha=gguf_lora.file_alpha(source.config), out_type="f32", name="wrong")
    base_t = peft_logprobs(case.model_dir, None, case.ids)
    adapted_t = peft_logprobs(case.model_dir, case.adapters["one"], case.ids)
    (base_l, wrong_l) = llama_logprobs(case, [{}, {"lora": str(wrong)}])
    tol = tolerance(float(np.abs(base_l - base_t).max()))
    miss = float(np.abs(wrong_l - adapted_t).max())
    print(f"{name}: without the reordering, max diff {miss:.3f} (tolerance {tol:.2e})")
    assert miss > PLANTED_FACTOR * tol


# ---------------------------------------------------------------------------------------------
# merged: a plain checkpoint, for every architecture
# ---------------------------------------------------------------------------------------------

MERGED_TOL = 1e-5  # fp32 W + scale·B·A against PEFT's separate product (measured ≤ 1e-6)


@pytest.mark.parametrize("name", CASES)
def test_merged_export_computes_what_peft_computes(name, cases, proc, tmp_path):
    case = cases(name)
    response = proc.call("adapters/export", {"adapterPath": str(case.adapters["one"]), "format": "merged",
                                             "outType": "f32", "outputPath": str(tmp_path / "merged")}, timeout=600)
    assert "result" in response, response
    merged = peft_logprobs(Path(response["result"]["outputPath"]), None, case.ids)
    adapted = peft_logprobs(case.model_dir, case.adapters["one"], case.ids)
    base = peft_logprobs(case.model_dir, None, case.ids)
    diff = float(np.abs(merged - adapted).max())
    print(f"{name}: merged max diff {diff:.2e} (tolerance {MERGED_TOL:.0e})")
    assert diff < MERGED_TOL
    assert float(np.abs(adapted - base).max()) > EFFECT_FLOOR * MERGED_TOL


# ---------------------------------------------------------------------------------------------
# merged-gguf: the adapter (trained on the checkpoint) folded into the converter-written GGUF
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_merged_gguf_into_the_converters_base_computes_what_peft_computes(name, cases, proc, tmp_path):
    """``baseModel`` names the served GGUF (written by llama.cpp's converter, which transformers cannot
    read for qwen3_5, gemma3 or phi3); the adapter was trained on the checkpoint. The merged file
    keeps every other tensor byte for byte, and llama.cpp on it computes what PEFT computes."""
    from sidecar.adapters.gguf_header import read_header
    from sidecar.adapters.source import read_adapter

    case = cases(name)
    response = proc.call("adapters/export", {
        "adapterPath": str(case.adapters["one"]), "format": "merged-gguf", "outType": "f32",
        "baseModel": str(case.base_gguf), "outputPath": str(tmp_path / "merged.gguf")}, timeout=600)
    assert "result" in response, response
    result = response["result"]
    merged = Path(result["outputPath"])
    assert result["adaptedWeights"] == len(read_adapter(case.adapters["one"]).pairs)
    assert result["baseGguf"] == str(case.base_gguf) and result["baseModel"] == str(case.base_gguf)
    base, out = read_header(case.base_gguf), read_header(merged)  # f32: values equal iff bytes equal
    assert out.metadata.keys() == base.metadata.keys() and out.tensors.keys() == base.tensors.keys()
    changed = [n for n in base.tensors if not np.array_equal(out.tensor_data(n), base.tensor_data(n))]
    assert len(changed) == result["adaptedWeights"]

    bare, diff, effect = gap(case, "one", {"model": str(merged)})
    tol = tolerance(bare)
    print(f"{name}: merged-gguf bare {bare:.2e}, max diff {diff:.2e}, tolerance {tol:.2e}, effect {effect:.2f} nat"
          f" (export {result['durationMs']} ms)")
    assert effect > EFFECT_FLOOR * tol, "the adapter barely changes the text: a wrong merge would pass"
    assert diff < tol, (name, diff, tol)


@pytest.mark.parametrize("name,planted", [("qwen3_5", "no-reorder"), ("llama", "no-reorder"),
                                          ("qwen3", "rslora-scale")])
def test_a_wrong_merged_gguf_fails_the_comparison(name, planted, cases, tmp_path):
    """The merge written without the converter's reordering (qwen3_5's value heads, llama's q/k rows)
    or with the rsLoRA adapter's scale taken as alpha/rank misses PEFT by far; the right merge of
    the same (rsLoRA) adapter passes."""
    from sidecar.adapters import merge_gguf
    from sidecar.adapters.gguf_layout import layout_for, read_config
    from sidecar.adapters.source import read_adapter, resolve_base

    case = cases(name)
    adapter = "two" if planted == "rslora-scale" else "one"
    source = read_adapter(case.adapters[adapter])
    layout = layout_for(read_config(resolve_base(source)), case.base_gguf, "merged-gguf")
    if planted == "no-reorder":
        assert layout.orders, "this architecture has reorderings to leave out"
        wrong = merge_gguf.factor_deltas(source, dataclasses.replace(layout, orders={}))
    else:
        assert source.config["use_rslora"]
        right = merge_gguf.factor_deltas(source, layout)
        assert merge_gguf.write_with_deltas(case.base_gguf, layout, right, tmp_path / "right.gguf", "f32") == \
            len(source.pairs)
        bare, diff, _ = gap(case, adapter, {"model": str(tmp_path / "right.gguf")})
        assert diff < tolerance(bare), (diff, tolerance(bare))
        wrong = merge_gguf.factor_deltas(dataclasses.replace(source, pairs=[
            dataclasses.replace(p, scale=p.alpha / p.rank) for p in source.pairs]), layout)
    merge_gguf.write_with_deltas(case.base_gguf, layout, wrong, tmp_path / "wrong.gguf", "f32")
    bare, miss, _ = gap(case, adapter, {"model": str(tmp_path / "wrong.gguf")})
    print(f"{name}: merged-gguf with {planted}, max diff {miss:.3f} (tolerance {tolerance(bare):.2e})")
    assert miss > PLANTED_FACTOR * tolerance(bare)


def test_dora_is_merged_by_peft_on_the_checkpoint(cases, proc, tmp_path):
    """DoRA's merge needs the base weights (its magnitudes), so PEFT merges it, on the checkpoint the
    adapter was made on (not on the GGUF), and the delta goes through the value-head reordering."""
    from tests.test_export import make_peft_adapter

    case = cases("qwen3_5")
    adapter = make_peft_adapter(case.model_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, b_std=0.05,
                                magnitude_noise=0.1, target_modules=["in_proj_qkv", "out_proj", "q_proj", "down_proj"])
    response = proc.call("adapters/export", {
        "adapterPath": str(adapter), "format": "merged-gguf", "outType": "f32", "baseModel": str(case.base_gguf),
        "outputPath": str(tmp_path / "dora.gguf")}, timeout=600)
    assert "result" in response, response
    bare, diff, effect = gap(dataclasses.replace(case, adapters={"dora": adapter}), "dora",
                             {"model": response["result"]["outputPath"]})
    tol = tolerance(bare)
    print(f"qwen3_5 DoRA: merged-gguf bare {bare:.2e}, max diff {diff:.2e}, tolerance {tol:.2e}, effect {effect:.2f}")
    assert effect > EFFECT_FLOOR * tol and diff < tol, (diff, tol, effect)


def test_a_gguf_of_another_model_is_refused(cases, tmp_path_factory, tmp_path):
    """The served GGUF is checked against the checkpoint the adapter was trained on: a GGUF of
    another model of the same shape (qwen3, other weights) is refused before anything is written."""
    from sidecar import errors
    from sidecar.adapters.export import export_adapter

    case = cases("qwen3")
    other = llamacpp_convert.convert(archmodels.cached(tmp_path_factory, "qwen3", seed=1),
                                     tmp_path / "other-f32.gguf", outtype="f32")
    for fmt in ("merged-gguf", "gguf-lora"):
        with pytest.raises(errors.ExportRefused) as refused:
            export_adapter(case.adapters["one"], fmt, output_path=str(tmp_path / "out.gguf"), base_model=str(other))
        assert refused.value.data["reason"] == "layout" and "disagree" in refused.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-f32.gguf"]


def test_without_the_trained_checkpoint_what_transformers_cannot_read_is_refused(cases, tmp_path, monkeypatch):
    """In process, transformers' failures injected: with the adapter's checkpoint gone, the config
    must come from the GGUF through transformers, and a DoRA merge needs transformers to read its
    weights; each failure is an ExportRefused saying what to do, and nothing is written."""
    import shutil

    from sidecar import errors
    from sidecar.adapters import merge, merge_gguf
    from sidecar.adapters.export import export_adapter
    from tests.test_export import make_peft_adapter

    case = cases("qwen3_5")
    adapter = make_peft_adapter(case.model_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, b_std=0.05,
                                target_modules=["out_proj"])
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": str(tmp_path / "gone")}))
    plain = shutil.copytree(case.adapters["one"], tmp_path / "plain")
    (plain / "training_manifest.json").unlink()  # no record of the checkpoint left
    config_file = plain / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": str(tmp_path / "gone")}))

    def unreadable(real):
        def read(base, *args):
            if base.hf_gguf_file:
                raise errors.ModelLoadFailed("transformers cannot read it (injected)")
            return real(base, *args)
        return read

    out = tmp_path / "out.gguf"
    with monkeypatch.context() as patch:
        patch.setattr(merge, "_load_base_fp32", unreadable(merge._load_base_fp32))
        with pytest.raises(errors.ExportRefused) as refused:
            export_adapter(adapter, "merged-gguf", output_path=str(out), base_model=str(case.base_gguf))
    assert refused.value.data["reason"] == "variant-needs-checkpoint" and refused.value.data["variants"] == ["use_dora"]
    assert "checkpoint" in refused.value.message
    with monkeypatch.context() as patch:
        patch.setattr(merge_gguf, "read_config", unreadable(merge_gguf.read_config))
        for which in (adapter, plain):
            with pytest.raises(errors.ExportRefused) as refused:
                export_adapter(which, "merged-gguf", output_path=str(out), base_model=str(case.base_gguf))
            assert refused.value.data["reason"] == "base-config" and "checkpoint" in refused.value.message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dora", "plain"]


# ---------------------------------------------------------------------------------------------
# Two adapters stacked with scales: llama.cpp against the sidecar's stacked generate
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_stacked_adapters_in_llama_cpp_match_the_sidecars_stacked_generate(name, cases, proc):
    from transformers import AutoTokenizer

    case = cases(name)
    question = [MESSAGES[0]]
    response = proc.call("generate", {
        "baseModel": str(case.model_dir), "messages": question, "maxNewTokens": 12, "logprobs": True,
        "adapters": [{"path": str(case.adapters[k]), "scale": s} for k, s in STACK]}, timeout=300)
    assert "result" in response, response
    result = response["result"]
    generated, expected = result["tokenIds"], np.asarray(result["logprobs"])
    assert len(generated) >= 2, result
    tok = AutoTokenizer.from_pretrained(str(case.model_dir))
    prompt = tok(tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    ids = prompt + generated
    stacked, first_only, base_l = llama_logprobs(dataclasses.replace(case, ids=ids), [
        {"loras": [[str(case.exports[k]), s] for k, s in STACK]},
        {"loras": [[str(case.exports["one"]), 0.7]]},
        {}])
    base_t = peft_logprobs(case.model_dir, None, ids)
    tol = tolerance(float(np.abs(base_l - base_t).max()))
    got = stacked[-len(generated):]
    diff = float(np.abs(got - expected).max())
    second = float(np.abs(first_only[-len(generated):] - expected).max())
    print(f"{name}: stacked max diff {diff:.2e} (tolerance {tol:.2e}); without the second adapter {second:.3f}")
    assert diff < tol, (name, diff, tol)
    assert second > PLANTED_FACTOR * tol  # the second adapter matters: the comparison can fail


# ---------------------------------------------------------------------------------------------
# What llama.cpp cannot hold is refused before anything is written
# ---------------------------------------------------------------------------------------------

def test_a_lora_on_the_linear_attention_convolution_is_refused(cases, proc, tmp_path):
    """Qwen3.5's depthwise conv1d is not a matrix product in llama.cpp (``ggml_ssm_conv``): a LoRA
    there cannot be held by a GGUF LoRA file. PEFT can put one there; export names it and says why."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    case = cases("qwen3_5")
    model = AutoModelForCausalLM.from_pretrained(str(case.model_dir), dtype=torch.float32)
    # a depthwise convolution takes a LoRA of a rank divisible by its groups (its channels) in PEFT
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["conv1d", "out_proj"],
                                                  rank_pattern={"conv1d": 128}))
    peft_model.save_pretrained(str(tmp_path / "conv"))
    response = proc.call("adapters/export", {"adapterPath": str(tmp_path / "conv"), "format": "gguf-lora",
                                             "outputPath": str(tmp_path / "out.gguf")}, timeout=300)
    assert response["error"]["code"] == -32030, response
    data = response["error"]["data"]
    assert data["reason"] == "not-lora-capable"
    assert any("conv1d" in m for m in data["modules"]) and not any("out_proj" in m for m in data["modules"])
    assert "merged" in response["error"]["message"] and not (tmp_path / "out.gguf").exists()


def test_modules_llama_cpp_applies_no_lora_to_are_named_in_the_refusal(cases):
    """A plain (2-D) pair on a tensor gguf maps but llama.cpp's graph does not multiply through
    ``build_lora_mm`` (here the linear-attention norm, ``ssm_norm``) is refused by name."""
    from sidecar import errors
    from sidecar.adapters import preflight
    from sidecar.adapters.gguf_layout import layout_for, read_config
    from sidecar.adapters.source import LoraPair, read_adapter, resolve_base

    source = read_adapter(cases("qwen3_5").adapters["one"])
    layout = layout_for(read_config(resolve_base(source)), None, "gguf-lora")
    odd = LoraPair(module="model.layers.0.linear_attn.norm", a=np.zeros((4, 16), np.float32),
                   b=np.zeros((16, 4), np.float32), rank=4, alpha=8.0, scale=2.0)
    with pytest.raises(errors.ExportRefused) as refused:
        preflight.check_modules(dataclasses.replace(source, pairs=[*source.pairs, odd]), layout, "gguf-lora")
    assert refused.value.data["reason"] == "not-lora-capable"
    assert refused.value.data["modules"] == ["model.layers.0.linear_attn.norm (blk.0.ssm_norm.weight)"]
