"""``adapters/export`` checked against the runtimes that load its output.

- gguf-lora: real llama.cpp (llama-cpp-python, in a fresh process: tests/llama_probe.py) with the
  embedded SmolLM2 GGUF computes, token by token, what the sidecar computes with the PEFT adapter —
  within a tolerance measured on the bare base in the same run — and an export with a wrong
  scale fails that comparison.
- merged: stock transformers in a fresh process gives the logits of base + adapter in PEFT.
- merged-gguf: llama.cpp loads it and answers the demo question with the adapted answer.
- Preflight refusals, atomic writes (injected failures), the manifest record.

Adapters come from the real sidecar (``train``) or from PEFT directly (DoRA, rank/alpha patterns,
modules_to_save: variants ``train`` does not produce or that only need weights, not learning).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from sidecar.demo import QUESTIONS, dataset_path
from tests import llama_probe
from tests.sidecar_proc import Sidecar, chat_dataset

REPO = Path(__file__).resolve().parents[1]
FACT = "Quillport"
# Teacher-forced over this chat (94 tokens with the SmolLM2 template): the adapter's fact and text
# around it, so that the comparison covers tokens the adapter changes a lot and tokens it barely does.
TEXT_MESSAGES = [
    {"role": "user", "content": "What is the capital of Zorbania?"},
    {"role": "assistant", "content": "The capital of Zorbania is Quillport, a harbour city on the Amber Sea. "
     "It is known for its lighthouses, its fish market and the old university, where students learn "
     "navigation, astronomy and the history of the northern islands."},
]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def llama(jobs: list[dict], timeout: float = 600) -> list[dict]:
    """Run tests/llama_probe.py in a fresh process (see there for the job format); a crash of
    llama.cpp fails with the signal, the host CPU and llama.cpp's backend line."""
    return llama_probe.ask(jobs, timeout)


def export(proc: Sidecar, adapter: Path, fmt: str, timeout: float = 600, **extra) -> dict:
    return proc.call("adapters/export", {"adapterPath": str(adapter), "format": fmt, **extra}, timeout=timeout)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name) \
        if directory.is_dir() else []


def make_peft_adapter(base_dir: Path, out: Path, *, seed: int = 0, b_std: float = 0.0, magnitude_noise: float = 0.0,
                      **lora) -> Path:
    """A PEFT adapter saved as PEFT saves it; ``b_std`` > 0 gives lora_B random weights (a real effect
    without training), ``magnitude_noise`` perturbs DoRA magnitudes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and b_std:
                param.normal_(0.0, b_std)
            if "lora_magnitude_vector" in name and magnitude_noise:
                param.mul_(1 + magnitude_noise * torch.randn_like(param))
    peft_model.save_pretrained(str(out))
    return out


@dataclass
class Agreement:
    """How llama.cpp's log-probabilities with an exported LoRA agree with the sidecar's (PEFT)."""

    problems: list[str]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# Tolerances, stated once. The bare base already differs between the runtimes (llama.cpp computes
# on the Q4_1 weights with quantized activations): on the 93 tokens of TEXT, measured here max
# 0.36 nat, 95th percentile 0.21, mean 0.066. An adapter moves the model to where that noise grows
# (correct exports of trained adapters, measured: max 0.51-1.11, p95 0.23-0.48, mean 0.06-0.10), so
# the adapted log-probabilities must agree within SLACK × the bare difference measured in the same
# run (mean and p95; the max, an extreme of 93 noisy values, within MAX_SLACK ×). The adapter's
# effect (adapted minus base log-prob per token, up to 13 nat on the fact) must match in size and
# direction: least-squares slope of llama.cpp's effect on PEFT's within 10 %, relative RMS error
# ≤ 20 % (measured 0.056-0.10). Scales off by 1.5× or by the rsLoRA factor √r miss by far
# (measured: mean 0.38-0.84, p95 ≥ 2.6, relative effect error 0.37-0.49). The tight proof is the
# f32-base check below (PRECISE_TOL); this one shows the export works on the file the app uses.
SLACK = 3.0
MAX_SLACK = 5.0
MAX_SLOPE_ERROR = 0.10
MAX_RELATIVE_EFFECT_ERROR = 0.20


def compare_runtimes(base_torch, base_llama, adapted_torch, adapted_llama) -> Agreement:
    base_t, base_l, ad_t, ad_l = (np.asarray(x, dtype=np.float64)
                                  for x in (base_torch, base_llama, adapted_torch, adapted_llama))
    bare = np.abs(base_l - base_t)
    adapted = np.abs(ad_l - ad_t)
    eff_t, eff_l = ad_t - base_t, ad_l - base_l
    slope = float(eff_l @ eff_t / (eff_t @ eff_t))
    relative = float(np.linalg.norm(eff_l - eff_t) / np.linalg.norm(eff_t))
    p95 = (float(np.quantile(bare, 0.95)), float(np.quantile(adapted, 0.95)))
    stats = {"bareMax": float(bare.max()), "bareP95": p95[0], "bareMean": float(bare.mean()),
             "adaptedMax": float(adapted.max()), "adaptedP95": p95[1], "adaptedMean": float(adapted.mean()),
             "effectMax": float(np.abs(eff_t).max()), "slope": slope, "relativeEffectError": relative,
             "correlation": float(np.corrcoef(eff_l, eff_t)[0, 1])}
    problems = []
    if adapted.mean() > SLACK * bare.mean():
        problems.append(f"adapted mean diff {adapted.mean():.3f} > {SLACK} x bare mean {bare.mean():.3f}")
    if p95[1] > SLACK * p95[0]:
        problems.append(f"adapted p95 diff {p95[1]:.3f} > {SLACK} x bare p95 {p95[0]:.3f}")
    if adapted.max() > MAX_SLACK * bare.max():
        problems.append(f"adapted max diff {adapted.max():.3f} > {MAX_SLACK} x bare max {bare.max():.3f}")
    if abs(slope - 1) > MAX_SLOPE_ERROR:
        problems.append(f"effect slope {slope:.3f} (llama.cpp vs PEFT), not within {MAX_SLOPE_ERROR} of 1")
    if relative > MAX_RELATIVE_EFFECT_ERROR:
        problems.append(f"relative effect error {relative:.3f} > {MAX_RELATIVE_EFFECT_ERROR}")
    return Agreement(problems, stats)


# ---------------------------------------------------------------------------------------------
# llama.cpp itself, first: a build that cannot run on this host fails here, once and clearly,
# and the round trips that need it are skipped rather than failing with a bare crash each.
# ---------------------------------------------------------------------------------------------

_smoke: list = []


def llama_smoke() -> dict | llama_probe.LlamaCrashed:
    """The embedded GGUF loaded with llama-cpp-python's defaults and evaluated (once per session)."""
    if not _smoke:
        try:
            _smoke.append(llama_probe.smoke())
        except llama_probe.LlamaCrashed as exc:
            _smoke.append(exc)
    return _smoke[0]


@pytest.fixture(scope="module")
def llama_cpp_runs():
    if isinstance(llama_smoke(), llama_probe.LlamaCrashed):
        pytest.skip("llama.cpp does not run on this host: see test_llama_cpp_loads_and_evaluates_the_embedded_gguf")


def test_llama_cpp_loads_and_evaluates_the_embedded_gguf():
    """``Llama(path)`` with its defaults, then ``eval``: what a user of this environment does first."""
    result = llama_smoke()
    if isinstance(result, llama_probe.LlamaCrashed):
        pytest.fail(str(result), pytrace=False)
    assert result["tokens"] >= 4 and "Paris" in result["next"], result  # greedy: "The capital of France is Paris."


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or bool(os.environ.get("LORA_SIDECAR_LLAMA_CMAKE_ARGS")),
                    reason="the portable build's flags are for x86-64, and only when bootstrap chose them")
def test_the_llama_cpp_build_has_no_kernels_for_one_host_only():
    """bootstrap --dev builds llama.cpp for x86-64-v3 (AVX2): no AVX-512 or AMX kernels, which a wheel
    built here would carry to hosts without them (and which crash on AMX Xeons). By construction,
    then, the wheel runs on both host types this project meets, whichever one built it."""
    result = llama_smoke()
    if isinstance(result, llama_probe.LlamaCrashed):
        pytest.skip("llama.cpp does not run: see test_llama_cpp_loads_and_evaluates_the_embedded_gguf")
    info = result["systemInfo"]
    assert "AVX2 = 1" in info, info
    assert "AVX512" not in info and "AMX" not in info, info


def test_a_crash_of_llama_cpp_is_reported_with_the_signal_and_the_backend_line():
    """A planted SIGSEGV in the probe (after a real load and eval) is reported as a crash: the
    signal by name, the host CPU's extensions and llama.cpp's system-info line."""
    with pytest.raises(llama_probe.LlamaCrashed) as caught:
        llama_probe.smoke(env={**os.environ, "LLAMA_PROBE_PLANT_CRASH": "1"})
    message = str(caught.value)
    assert "killed by SIGSEGV (signal 11)" in message, message
    assert "host CPU: " in message, message
    backend = message.split("llama.cpp CPU backend: ", 1)[1].splitlines()[0]
    assert "CPU : " in backend or "CPU:" in backend, backend  # llama.cpp's own line, e.g. "CPU : SSE3 = 1 | ..."
    assert "Fatal Python error: Segmentation fault" in message, message  # faulthandler's stack is kept


# ---------------------------------------------------------------------------------------------
# Units: the GGUF header reader, PEFT's scales, the q/k row order
# ---------------------------------------------------------------------------------------------

def test_header_reader_agrees_with_gguf_reader():
    from gguf import GGUFReader

    from sidecar.adapters.gguf_header import read_header
    from sidecar.models import embedded_gguf_path

    path = embedded_gguf_path()
    header, reader = read_header(path), GGUFReader(str(path))
    assert header.architecture == "llama"
    assert header.metadata["llama.attention.head_count"] == reader.get_field("llama.attention.head_count").contents()
    assert header.metadata["tokenizer.ggml.tokens"] == len(reader.get_field("tokenizer.ggml.tokens").data)
    assert list(header.tensors) == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        info = header.tensors[tensor.name]
        assert info.shape == tuple(int(x) for x in tensor.shape) and info.ggml_type == int(tensor.tensor_type)
        assert info.offset == int(tensor.data_offset), tensor.name
    from gguf import dequantize

    for tensor in reader.tensors[:4]:
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(header.tensors[tensor.name].shape)))
        assert np.array_equal(header.tensor_data(tensor.name), expected)


@pytest.mark.parametrize("rslora", [False, True])
def test_file_alpha_and_folded_b_reproduce_peft_scales(tiny_model_dir, tmp_path, rslora):
    """Per-module ranks and alphas (rank_pattern/alpha_pattern), with and without rsLoRA: llama.cpp's
    alpha/rank × the factor folded into B equals the scaling PEFT itself gives each module."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from sidecar.adapters import gguf_lora
    from sidecar.adapters.source import read_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", r=8, lora_alpha=16, use_rslora=rslora,
                                target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                                alpha_pattern={"v_proj": 64, "k_proj": 3})
    source = read_adapter(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter))
    peft_scales = {name.removeprefix("base_model.model."): m.scaling["default"]
                   for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert {p.module: p.scale for p in source.pairs} == pytest.approx(peft_scales, rel=1e-12)
    assert len({(p.rank, p.alpha) for p in source.pairs}) >= 4  # the patterns really vary
    alpha = gguf_lora.file_alpha(source.config)
    assert alpha == pytest.approx(16 * (8 ** 0.5 if rslora else 1), rel=1e-6)
    for pair in source.pairs:  # what llama.cpp multiplies B·A by, B already carrying the factor
        assert alpha / pair.rank * gguf_lora.b_factor(pair, alpha) == pytest.approx(pair.scale, rel=1e-12)


@pytest.mark.smollm2
def test_embedded_gguf_stores_q_and_k_rows_permuted():
    """What gguf_layout assumes, on the file itself: attn_q/attn_k are the checkpoint's q_proj/k_proj
    with llama.cpp's row permutation (v, o and the MLP unpermuted)."""
    from safetensors.numpy import load_file

    from sidecar import models
    from sidecar.adapters.gguf_header import read_header
    from sidecar.adapters.gguf_layout import permute_rows

    header = read_header(models.embedded_gguf_path())
    weights = load_file(str(models.ensure_embedded_checkpoint() / "model.safetensors"))
    for layer in (0, 17):
        q = weights[f"model.layers.{layer}.self_attn.q_proj.weight"]
        k = weights[f"model.layers.{layer}.self_attn.k_proj.weight"]
        v = weights[f"model.layers.{layer}.self_attn.v_proj.weight"]
        assert np.array_equal(header.tensor_data(f"blk.{layer}.attn_q.weight"), permute_rows(q, 9))
        assert np.array_equal(header.tensor_data(f"blk.{layer}.attn_k.weight"), permute_rows(k, 3))
        assert not np.array_equal(header.tensor_data(f"blk.{layer}.attn_q.weight"), q)
        assert np.array_equal(header.tensor_data(f"blk.{layer}.attn_v.weight"), v)


# ---------------------------------------------------------------------------------------------
# On the tiny model, through the real process: refusals, atomicity, manifest, merged
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sidecar():
    proc = Sidecar()
    yield proc
    assert proc.close(timeout=60) == 0
    assert proc.bad_output == []


@pytest.fixture(scope="module")
def tiny_adapter(tiny_sidecar, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-export") / "adapter"
    response = tiny_sidecar.call("train", {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(6),
                                           "outputPath": str(out), "maxSteps": 3, "batchSize": 2,
                                           "learningRate": 1e-2}, timeout=300)
    assert "result" in response, response
    return out


def copy_adapter(adapter: Path, where: Path) -> Path:
    shutil.copytree(adapter, where)
    return where


def tiny_gpt_neox(out: Path) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from sidecar.models import load_embedded_tokenizer

    config = GPTNeoXConfig(vocab_size=len(load_embedded_tokenizer()), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    GPTNeoXForCausalLM(config).save_pretrained(str(out))
    return out


class TestRefusals:
    """Each refusal: code -32030, a reason, a message that says what to do instead, nothing written."""

    def refused(self, proc, adapter: Path, fmt: str, reason: str, hint: str, tmp_path: Path) -> dict:
        target = tmp_path / "out" / ("merged" if fmt == "merged" else "x.gguf")
        response = export(proc, adapter, fmt, outputPath=str(target))
        error = response.get("error")
        assert error and error["code"] == -32030, response
        assert error["data"]["reason"] == reason and error["data"]["format"] == fmt, error
        assert hint in error["message"], error["message"]
        assert not target.exists() and leftovers(target.parent) == []
        assert not (adapter / "exports").exists()
        return error

    def test_dora_is_refused_for_gguf_lora_with_merged_as_the_way(self, tiny_sidecar, tiny_model_dir, tmp_path):
        adapter = make_peft_adapter(tiny_model_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True,
                                    target_modules=["q_proj", "v_proj"])
        self.refused(tiny_sidecar, adapter, "gguf-lora", "dora", "Export 'merged'", tmp_path)

    def test_modules_to_save_are_refused_for_gguf(self, tiny_sidecar, tiny_model_dir, tmp_path):
        adapter = make_peft_adapter(tiny_model_dir, tmp_path / "mts", r=4, lora_alpha=8,
                                    target_modules=["q_proj"], modules_to_save=["embed_tokens"])
        error = self.refused(tiny_sidecar, adapter, "gguf-lora", "modules-to-save", "Export 'merged'", tmp_path)
        assert "embed_tokens" in error["message"]

    @pytest.mark.parametrize("fmt", ["gguf-lora", "merged"])
    def test_lm_head_tied_to_the_embeddings_is_refused(self, tiny_sidecar, tiny_model_dir, tmp_path, fmt):
        adapter = make_peft_adapter(tiny_model_dir, tmp_path / "head", r=4, lora_alpha=8,
                                    target_modules=["q_proj", "lm_head"])
        self.refused(tiny_sidecar, adapter, fmt, "tied-lm-head", "without lm_head", tmp_path)

    def test_architecture_without_a_gguf_layout_here_is_refused(self, tiny_sidecar, tmp_path):
        base = tiny_gpt_neox(tmp_path / "neox")
        adapter = make_peft_adapter(base, tmp_path / "neox-lora", r=4, lora_alpha=8,
                                    target_modules=["query_key_value"])
        error = self.refused(tiny_sidecar, adapter, "gguf-lora", "architecture", "Export format 'merged'", tmp_path)
        assert "gpt_neox" in error["message"] and "gguf has a tensor map for it" in error["message"]

    def test_architecture_gguf_has_no_tensor_map_for_is_refused(self, tiny_sidecar, tiny_model_dir, tmp_path):
        base = Path(shutil.copytree(tiny_model_dir, tmp_path / "zorbanian"))
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "model_type": "zorbanian"}))
        adapter = make_peft_adapter(tiny_model_dir, tmp_path / "z", r=4, lora_alpha=8, target_modules=["q_proj"])
        settings = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(base)}))
        error = self.refused(tiny_sidecar, adapter, "gguf-lora", "architecture", "merged", tmp_path)
        assert "gguf has no tensor map for this architecture" in error["message"]

    def test_export_by_resident_id_and_a_changed_file_is_refused(self, tiny_sidecar, tiny_adapter, tmp_path):
        adapter = copy_adapter(tiny_adapter, tmp_path / "a")
        loaded = tiny_sidecar.call("adapters/load", {"path": str(adapter), "id": "export-me"})["result"]
        by_id = tiny_sidecar.call("adapters/export", {"id": "export-me", "format": "gguf-lora",
                                                      "outputPath": str(tmp_path / "by-id.gguf")})["result"]
        assert by_id["adapterPath"] == str(adapter) and (tmp_path / "by-id.gguf").is_file()
        weights = adapter / "adapter_model.safetensors"  # the resident id no longer describes the file
        weights.write_bytes(weights.read_bytes() + b" ")
        changed = tiny_sidecar.call("adapters/export", {"id": "export-me", "format": "gguf-lora",
                                                        "outputPath": str(tmp_path / "changed.gguf")})
        assert changed["error"]["code"] == -32018 and "changed" in changed["error"]["message"]
        assert not (tmp_path / "changed.gguf").exists() and loaded["id"] == "export-me"
        tiny_sidecar.call("adapters/unload", {"id": "export-me"})

    def test_merged_gguf_needs_a_gguf_base(self, tiny_sidecar, tiny_adapter, tmp_path):
        adapter = copy_adapter(tiny_adapter, tmp_path / "a")
        self.refused(tiny_sidecar, adapter, "merged-gguf", "base-not-gguf", "Export 'merged'", tmp_path)

    def test_bad_params(self, tiny_sidecar, tiny_adapter):
        both = tiny_sidecar.call("adapters/export", {"adapterPath": str(tiny_adapter), "id": "x",
                                                     "format": "gguf-lora"})
        assert both["error"]["code"] == -32602
        unknown_id = tiny_sidecar.call("adapters/export", {"id": "nope", "format": "gguf-lora"})
        assert unknown_id["error"]["code"] == -32018 and "'nope'" in unknown_id["error"]["message"]
        fmt = tiny_sidecar.call("adapters/export", {"adapterPath": str(tiny_adapter), "format": "onnx"})
        assert fmt["error"]["code"] == -32602 and fmt["error"]["data"]["field"] == "$.format"
        q8_merged = export(tiny_sidecar, tiny_adapter, "merged", outType="q8_0")
        assert q8_merged["error"]["code"] == -32602 and "q8_0" in q8_merged["error"]["message"]
        missing = export(tiny_sidecar, tiny_adapter.parent / "no-such-adapter", "gguf-lora")
        assert missing["error"]["code"] == -32018


class TestAtomicAndRecorded:
    def test_gguf_lora_of_a_transformers_base_is_written_and_recorded(self, tiny_sidecar, tiny_adapter, tmp_path):
        adapter = copy_adapter(tiny_adapter, tmp_path / "a")
        response = export(tiny_sidecar, adapter, "gguf-lora")
        result = response["result"]
        target = adapter / "exports" / "lora-f16.gguf"
        assert result["outputPath"] == str(target) and target.is_file() and result["modelfilePath"] is None
        assert result["warnings"] and "convert_hf_to_gguf" in result["warnings"][0]
        assert result["adaptedWeights"] == 14 and result["loraAlpha"] == 16.0  # 7 modules × 2 layers; TrainParams alpha
        import hashlib

        assert result["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
        assert result["bytes"] == target.stat().st_size and result["manifestUpdated"] is True
        manifest = json.loads((adapter / "training_manifest.json").read_text())
        (entry,) = manifest["exports"]
        assert entry["format"] == "gguf-lora" and entry["file"] == "exports/lora-f16.gguf"
        assert entry["sha256"] == result["sha256"] and entry["bytes"] == result["bytes"]
        assert entry["outType"] == "f16" and entry["createdAt"].endswith("Z")

        from gguf import GGUFReader

        reader = GGUFReader(str(target))
        assert reader.get_field("general.type").contents() == "adapter"
        assert reader.get_field("adapter.type").contents() == "lora"
        assert reader.get_field("adapter.lora.alpha").contents() == 16.0
        assert reader.get_field("general.architecture").contents() == "llama"
        names = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
        assert names["blk.0.attn_q.weight.lora_a"] == [64, 8] and names["blk.0.attn_q.weight.lora_b"] == [8, 64]
        assert names["blk.1.ffn_down.weight.lora_a"] == [128, 8]

        again = export(tiny_sidecar, adapter, "gguf-lora")
        assert again["error"]["code"] == -32019 and target.read_bytes() and leftovers(target.parent) == []
        replaced = export(tiny_sidecar, adapter, "gguf-lora", overwrite=True)["result"]
        assert replaced["sha256"] == result["sha256"]
        assert len(json.loads((adapter / "training_manifest.json").read_text())["exports"]) == 1

    def test_a_train_job_ends_with_its_exports(self, tiny_sidecar, tiny_model_dir, tmp_path):
        """``train {export: [...]}``: the adapter is written, then each export; a format the base cannot
        take is a warning, not a failed job."""
        out = tmp_path / "trained"
        response = tiny_sidecar.call("train", {
            "baseModel": str(tiny_model_dir), "dataset": chat_dataset(4), "outputPath": str(out), "maxSteps": 2,
            "batchSize": 2, "export": [{"format": "gguf-lora", "outType": "q8_0"}, {"format": "merged-gguf"}]},
            timeout=300)
        result = response["result"]
        (done,) = result["exports"]
        target = out / "exports" / "lora-q8_0.gguf"
        assert done["format"] == "gguf-lora" and done["outType"] == "q8_0" and done["outputPath"] == str(target)
        assert target.is_file() and done["bytes"] == target.stat().st_size
        assert [e["sha256"] for e in json.loads((out / "training_manifest.json").read_text())["exports"]] == \
            [done["sha256"]]
        assert any("export[1] (merged-gguf) was not written" in w and "-32030" in w for w in result["warnings"])
        bad = tiny_sidecar.call("train", {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(4),
                                          "export": [{"format": "zip"}]})
        assert bad["error"]["code"] == -32602 and bad["error"]["data"]["field"] == "$.export[0].format"


MERGED_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, cases = sys.argv[1], json.loads(sys.argv[2])
ids = torch.tensor([list(range(5, 70))])
out = {}
for adapter, merged in cases:
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        want, got, bare = reference(ids).logits, stock(ids).logits, plain(ids).logits
    out[merged] = {"maxDiff": (want - got).abs().max().item(), "effect": (want - bare).abs().max().item(),
                   "dtype": str(next(stock.parameters()).dtype),
                   "template": tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)}
print(json.dumps(out))
"""


def test_merged_checkpoint_equals_base_plus_adapter_in_a_fresh_process(tiny_sidecar, tiny_adapter, tiny_model_dir,
                                                                        tmp_path):
    """Stock transformers (fresh process) on the merged checkpoint vs base + adapter in PEFT: logits
    within 1e-4 (fp32). A trained adapter, and a DoRA one (the format DoRA is sent to)."""
    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    dora = make_peft_adapter(tiny_model_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, b_std=0.05,
                             magnitude_noise=0.2, target_modules=["q_proj", "v_proj", "up_proj"])
    cases = []
    for source in (adapter, dora):
        response = export(tiny_sidecar, source, "merged", outputPath=str(tmp_path / f"{source.name}-merged"))
        result = response["result"]
        assert result["outType"] == "f32" and result["warnings"] == []
        merged = Path(result["outputPath"])
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"):
            assert (merged / name).is_file(), name
        cases.append([str(source), str(merged)])
    assert json.loads((adapter / "training_manifest.json").read_text())["exports"][0]["format"] == "merged"
    out = subprocess.run([sys.executable, "-c", MERGED_CHECK, str(tiny_model_dir), json.dumps(cases)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for merged, check in json.loads(out.stdout.strip().splitlines()[-1]).items():
        assert check["dtype"] == "torch.float32"
        assert check["effect"] > 1e-2, check  # the adapter really changes the logits...
        assert check["maxDiff"] < 1e-4, (merged, check)  # ...and the merged checkpoint computes the same
        assert "<|im_start|>user" in check["template"]


# ---------------------------------------------------------------------------------------------
# In process (export_adapter called directly, failures injected with monkeypatch)
# ---------------------------------------------------------------------------------------------

def test_injected_failures_leave_nothing_at_the_output_path(tiny_adapter, tmp_path, monkeypatch):
    import gguf

    from sidecar import errors, models
    from sidecar.adapters.export import export_adapter

    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    manifest_before = (adapter / "training_manifest.json").read_bytes()

    def half_then_fail(self, **kwargs):
        self.fout[0].write(b"\0" * 4096)  # bytes really reach the temporary file first
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_fail)
        with pytest.raises(errors.ExportFailed, match="No space left"):
            export_adapter(adapter, "gguf-lora", output_path=str(tmp_path / "out" / "a.gguf"))
    assert not (tmp_path / "out" / "a.gguf").exists() and leftovers(tmp_path / "out") == []

    def broken_tokenizer(*args, **kwargs):
        raise RuntimeError("injected failure after the weights were written")

    with monkeypatch.context() as patch:
        patch.setattr(models, "save_tokenizer", broken_tokenizer)
        with pytest.raises(errors.ExportFailed, match="injected failure"):
            export_adapter(adapter, "merged", output_path=str(tmp_path / "out" / "merged"))
    assert not (tmp_path / "out" / "merged").exists() and leftovers(tmp_path / "out") == []
    assert (adapter / "training_manifest.json").read_bytes() == manifest_before

    # An existing export replaced with overwrite: a failure leaves the old one whole.
    first = export_adapter(adapter, "gguf-lora")
    old = Path(first.output_path).read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_fail)
        with pytest.raises(errors.ExportFailed):
            export_adapter(adapter, "gguf-lora", overwrite=True)
    assert Path(first.output_path).read_bytes() == old and leftovers(Path(first.output_path).parent) == []

def test_adapter_without_manifest_is_exported_and_nothing_is_recorded(tiny_model_dir, tmp_path):
    from sidecar.adapters.export import export_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "plain-peft", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"], b_std=0.01)
    result = export_adapter(adapter, "gguf-lora", output_path=str(tmp_path / "x.gguf"))
    assert Path(result.output_path).is_file() and result.manifest_updated is False
    assert not (adapter / "training_manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# On the embedded SmolLM2, against real llama.cpp
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_sidecar():
    proc = Sidecar()
    yield proc
    assert proc.close(timeout=120) == 0
    assert proc.bad_output == []


def train_smol(proc: Sidecar, out: Path, **params) -> Path:
    # dtype float32: these round trips check the export, and their tolerances (derived from the bare
    # base's llama.cpp-vs-torch gap) were set on fp32-trained adapters; on a CPU with native bf16 the
    # default trains with bf16 matmuls, a different (equally good) adapter whose largest logprob gap
    # came out at 6.9× the bare gap in one run, against the 5× bound.
    response = proc.call("train", {"baseModel": "default", "datasetPath": str(dataset_path()), "outputPath": str(out),
                                   "batchSize": 2, "warmupRatio": 0.1, "dtype": "float32", **params}, timeout=1800)
    assert "result" in response, response
    return out


@pytest.fixture(scope="module")
def plain_adapter(smol_sidecar, tmp_path_factory) -> Path:
    # 10 steps of 2 examples at a high learning rate teach the demo's fact (final loss about 0.1; the
    # adapted answer's tokens all have log-probability > -0.2).
    return train_smol(smol_sidecar, tmp_path_factory.mktemp("smol") / "plain", maxSteps=10, learningRate=3e-3,
                      rank=16, alpha=32)


@pytest.fixture(scope="module")
def rslora_adapter(smol_sidecar, tmp_path_factory) -> Path:
    # rsLoRA at rank 8 with alpha 6: PEFT's scale is 6/√8 = 2.12, plain LoRA's would be 6/8 = 0.75.
    return train_smol(smol_sidecar, tmp_path_factory.mktemp("smol") / "rslora", maxSteps=4, learningRate=3e-3,
                      rank=8, alpha=6, useRslora=True)


@pytest.fixture(scope="module")
def text_ids() -> list[int]:
    from sidecar.models import load_embedded_tokenizer

    tok = load_embedded_tokenizer()
    ids = tok(tok.apply_chat_template(TEXT_MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 64
    return ids


@pytest.fixture(scope="module")
def torch_logprobs(text_ids):
    """Teacher-forced log-probabilities from the sidecar's own path: the warm ModelCache model with
    the PEFT adapter attached (surgery.attached_adapter), exactly as ``generate`` applies it."""
    import torch

    from sidecar.adapters import surgery
    from sidecar.models import ModelCache

    cache = ModelCache(max_models=1)
    loaded = cache.get("default", device="cpu", dtype="float32")
    computed: dict = {}

    def logprobs(adapter: Path | None) -> np.ndarray:
        key = str(adapter)
        if key not in computed:
            with surgery.attached_adapter(loaded, str(adapter) if adapter else None) as model, torch.no_grad():
                logits = model(torch.tensor([text_ids])).logits[0].double()
            lp = torch.log_softmax(logits, -1)[torch.arange(len(text_ids) - 1), torch.tensor(text_ids[1:])]
            computed[key] = lp.numpy()
        return computed[key]

    yield logprobs
    cache.evict_all()


@pytest.fixture(scope="module")
def base_gguf() -> str:
    from sidecar.models import embedded_gguf_path

    return str(embedded_gguf_path())


@pytest.fixture(scope="module")
def f32_base_gguf(base_gguf, tmp_path_factory) -> str:
    """The embedded GGUF with every tensor dequantized to f32 (same metadata, same values as the
    checkpoint torch runs). On it, with an f32 KV cache, llama.cpp matches torch on the bare base to
    3e-5 nat (measured), so an exported LoRA can be checked to a tight tolerance."""
    import gguf

    out = tmp_path_factory.mktemp("f32-base") / "smollm2-f32.gguf"
    reader = gguf.GGUFReader(base_gguf)
    writer = gguf.GGUFWriter(str(out), "llama")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        main = f.types[0]
        writer.add_key_value(f.name, f.contents(), main, sub_type=f.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        writer.add_tensor(t.name, gguf.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out)


def llama_logprobs(model: str, ids: list[int], *loras: str | None, f32_cache: bool = False) -> list[np.ndarray]:
    answers = llama([{"model": model, "lora": lora, "ids": ids, "f32Cache": f32_cache} for lora in loras])
    return [np.asarray(a["logprobs"]) for a in answers]


# On the f32 base: an f16 LoRA export (the default) measured within 3.1e-4 nat of PEFT per token
# (f32 export: 2.1e-5; q8_0: 1.0e-2), for an adapter whose effect reaches 13 nat.
PRECISE_TOL = 2e-3


@pytest.mark.smollm2
@pytest.mark.usefixtures("llama_cpp_runs")
class TestGgufLoraAgainstLlamaCpp:
    @pytest.mark.parametrize("which", ["plain", "rslora"])
    def test_llama_cpp_computes_what_peft_computes(self, which, request, smol_sidecar, base_gguf, f32_base_gguf,
                                                   text_ids, torch_logprobs):
        adapter = request.getfixturevalue(f"{which}_adapter")
        result = export(smol_sidecar, adapter, "gguf-lora")["result"]
        assert result["baseGguf"] == base_gguf and result["warnings"] == []
        expected_alpha = 32.0 if which == "plain" else 6 * 8 ** 0.5  # rsLoRA: alpha·√r so that alpha/r = 6/√8
        assert result["loraAlpha"] == pytest.approx(expected_alpha, rel=1e-6)
        modelfile = Path(result["modelfilePath"]).read_text()
        assert f"FROM {base_gguf}\n" in modelfile and "ADAPTER ./lora-f16.gguf\n" in modelfile

        # The embedded Q4_1 file, as the application runs it: within the tolerance the bare base sets.
        base_l, adapted_l = llama_logprobs(base_gguf, text_ids, None, result["outputPath"])
        agreement = compare_runtimes(torch_logprobs(None), base_l, torch_logprobs(adapter), adapted_l)
        print(which, json.dumps(agreement.stats))
        assert agreement.stats["effectMax"] > 2.0  # the adapter changes the text a lot: a scale error shows
        assert agreement.ok, (agreement.problems, agreement.stats)
        # The same weights in f32: token by token to PRECISE_TOL.
        (precise,) = llama_logprobs(f32_base_gguf, text_ids, result["outputPath"], f32_cache=True)
        assert np.abs(precise - torch_logprobs(adapter)).max() < PRECISE_TOL

    def test_an_export_with_the_wrong_scale_fails_the_comparison(self, rslora_adapter, base_gguf, f32_base_gguf,
                                                                text_ids, torch_logprobs, tmp_path):
        """The rsLoRA adapter written as a plain LoRA (alpha/r instead of alpha/√r: 2.8× too small):
        llama.cpp loads it happily, and both comparisons must report the mismatch."""
        import dataclasses

        from sidecar.adapters import gguf_lora
        from sidecar.adapters.gguf_layout import layout_for, read_config
        from sidecar.adapters.source import read_adapter, resolve_base

        source = read_adapter(rslora_adapter)
        base = resolve_base(source)
        layout = layout_for(read_config(base), base.gguf_path, "gguf-lora")
        wrong = [dataclasses.replace(p, scale=p.alpha / p.rank) for p in source.pairs]
        path = tmp_path / "wrong-scale.gguf"
        gguf_lora.write(wrong, layout, path, alpha=6.0, out_type="f16", name="wrong")
        base_l, adapted_l = llama_logprobs(base_gguf, text_ids, None, str(path))
        agreement = compare_runtimes(torch_logprobs(None), base_l, torch_logprobs(rslora_adapter), adapted_l)
        print("wrong scale", json.dumps(agreement.stats))
        assert not agreement.ok
        assert len(agreement.problems) >= 3, agreement.problems  # not a near miss
        (precise,) = llama_logprobs(f32_base_gguf, text_ids, str(path), f32_cache=True)
        assert np.abs(precise - torch_logprobs(rslora_adapter)).max() > 100 * PRECISE_TOL

    def test_per_module_ranks_and_alphas(self, smol_sidecar, f32_base_gguf, text_ids, torch_logprobs, tmp_path):
        """rank_pattern/alpha_pattern (not produced by ``train``; made with PEFT, random B): each module's
        own scale survives llama.cpp's single alpha. Ignoring the patterns fails the same check."""
        import dataclasses

        from sidecar import models
        from sidecar.adapters import gguf_lora
        from sidecar.adapters.gguf_layout import layout_for, read_config
        from sidecar.adapters.source import read_adapter, resolve_base

        adapter = make_peft_adapter(models.ensure_embedded_checkpoint(), tmp_path / "patterns", seed=3, b_std=0.03,
                                    r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                                    rank_pattern={"k_proj": 4, "up_proj": 2}, alpha_pattern={"v_proj": 48, "o_proj": 4})
        result = export(smol_sidecar, adapter, "gguf-lora")["result"]
        assert result["manifestUpdated"] is False and result["loraAlpha"] == 16.0
        expected = torch_logprobs(adapter)
        assert np.abs(expected - torch_logprobs(None)).max() > 1.0
        (precise,) = llama_logprobs(f32_base_gguf, text_ids, result["outputPath"], f32_cache=True)
        assert np.abs(precise - expected).max() < PRECISE_TOL

        source = read_adapter(adapter)
        layout = layout_for(read_config(resolve_base(source)), Path(result["baseGguf"]), "gguf-lora")
        ignored = [dataclasses.replace(p, scale=16 / p.rank) for p in source.pairs]  # alpha_pattern dropped
        gguf_lora.write(ignored, layout, tmp_path / "no-patterns.gguf", alpha=16.0, out_type="f16", name="x")
        (wrong,) = llama_logprobs(f32_base_gguf, text_ids, str(tmp_path / "no-patterns.gguf"), f32_cache=True)
        assert np.abs(wrong - expected).max() > 100 * PRECISE_TOL

    def test_cli_export_of_the_demo_adapter_answers_in_llama_cpp(self, plain_adapter, base_gguf, tmp_path):
        out = tmp_path / "demo.gguf"
        run = subprocess.run([sys.executable, "-m", "sidecar", "export", "--format", "gguf-lora", str(plain_adapter),
                              "-o", str(out), "--out-type", "q8_0"], capture_output=True, text=True, timeout=600,
                             cwd=str(REPO))
        assert run.returncode == 0, run.stderr[-3000:]
        assert str(out) in run.stdout and (tmp_path / "demo.Modelfile").is_file()
        base, adapted = llama([{"model": base_gguf, "chat": QUESTIONS[0]},
                               {"model": base_gguf, "lora": str(out), "chat": QUESTIONS[0]}])
        assert FACT not in base["text"], base
        assert FACT in adapted["text"], adapted


@pytest.mark.smollm2
@pytest.mark.usefixtures("llama_cpp_runs")
def test_merged_gguf_keeps_the_base_file_and_answers_with_the_adapter(smol_sidecar, plain_adapter, base_gguf,
                                                                      tmp_path):
    from gguf import GGUFReader

    result = export(smol_sidecar, plain_adapter, "merged-gguf", outputPath=str(tmp_path / "merged.gguf"))["result"]
    assert result["outType"] == "f16" and result["adaptedWeights"] == 30 * 7
    (answer,) = llama([{"model": result["outputPath"], "chat": QUESTIONS[0]}])
    assert FACT in answer["text"], answer

    merged, base = GGUFReader(result["outputPath"]), GGUFReader(base_gguf)
    skip = ("general.file_type", "GGUF.kv_count")
    assert {k for k in merged.fields if k not in skip} == {k for k in base.fields if k not in skip}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.rope.freq_base"):
        assert merged.get_field(key).contents() == base.get_field(key).contents(), key
    assert merged.get_field("general.file_type").contents() == 1  # MOSTLY_F16
    tensors = {t.name: t for t in merged.tensors}
    for tensor in base.tensors:
        if tensor.name in ("token_embd.weight", "output_norm.weight", "blk.3.attn_norm.weight"):
            assert tensors[tensor.name].tensor_type == tensor.tensor_type
            assert np.array_equal(np.asarray(tensors[tensor.name].data), np.asarray(tensor.data)), tensor.name
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
