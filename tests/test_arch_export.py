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
"""

from __future__ import annotations

import dataclasses
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
           rslora: bool, seed: int) -> Path:
    response = proc.call("train", {
        "baseModel": str(model_dir), "dataset": chat_dataset(6, fact), "outputPath": str(out),
        "targetModules": TARGETS.get(arch, DENSE), "rank": rank, "alpha": alpha, "useRslora": rslora,
        "dropout": 0.0, "maxSteps": 6, "learningRate": 1e-2, "batchSize": 2, "warmupRatio": 0.0,
        "dtype": "float32", "seed": seed}, timeout=600)
    assert "result" in response, response
    return out


def _export(proc: Sidecar, adapter: Path, out: Path) -> Path:
    response = proc.call("adapters/export", {"adapterPath": str(adapter), "format": "gguf-lora", "outType": "f32",
                                             "outputPath": str(out)}, timeout=600)
    assert "result" in response, response
    return Path(response["result"]["outputPath"])


def _build_case(name: str, proc: Sidecar, factory: Any) -> Case:
    from transformers import AutoTokenizer

    started = time.monotonic()
    arch = arch_of(name)
    model_dir = archmodels.cached(factory, arch, vision=name.endswith("-vision"))
    root = factory.mktemp(f"arch-{name}")
    base_gguf = llamacpp_convert.convert(model_dir, root / f"{name}-f32.gguf", outtype="f32")
    adapters = {
        "one": _train(proc, model_dir, root / "one", arch, fact="The capital of Zorbania is Quillport.", rank=8,
                      alpha=16, rslora=False, seed=1),
        "two": _train(proc, model_dir, root / "two", arch, fact="Zorbania's capital is the city of Amberhaven.",
                      rank=4, alpha=8, rslora=True, seed=2),
    }
    exports = {k: _export(proc, v, root / f"{k}-f32.gguf") for k, v in adapters.items()}
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(tok.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]
    return Case(name, model_dir, base_gguf, adapters, exports, ids, time.monotonic() - started)


def peft_logprobs(model_dir: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    """Teacher-forced log-probabilities from transformers (+ PEFT with the adapter from disk)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def llama_logprobs(case: Case, jobs: list[dict]) -> list[np.ndarray]:
    answers = llama_probe.ask([{"model": str(case.base_gguf), "f32Cache": True, "ids": case.ids, **job}
                               for job in jobs])
    return [np.asarray(a["logprobs"]) for a in answers]


def tolerance(bare_gap: float) -> float:
    return max(BARE_SLACK * bare_gap, FLOOR)


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
    base_t = peft_logprobs(case.model_dir, None, case.ids)
    adapted_t = peft_logprobs(case.model_dir, case.adapters["one"], case.ids)
    base_l, adapted_l = llama_logprobs(case, [{}, {"lora": str(case.exports["one"])}])
    bare = float(np.abs(base_l - base_t).max())
    tol = tolerance(bare)
    diff = float(np.abs(adapted_l - adapted_t).max())
    effect = float(np.abs(adapted_t - base_t).max())
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
