"""``merged-gguf`` quantized by llama.cpp's own quantizer (``q4_0``, ``q4_k_m``), checked in real llama.cpp.

On the embedded SmolLM2 (Q4_1) with the demo adapter: the merge is exported as f16 and as q4_0 /
q4_k_m, and the adapter with its deltas zeroed (the bare base through the very same path) as q4_0 /
q4_k_m. llama.cpp (a fresh process, tests/llama_probe.py) gives each file's teacher-forced
log-probabilities on the text of tests/test_export.py. Quantizing to 4 bits moves a 135M model a lot
(the bare base, Q4_1 requantized: mean 0.86 nat per token at q4_0, one token 16 nat), so the
quantized merge is not compared to an absolute bound but to that gap: it must be as far from the f16
merge as the quantized bare base is from the base, and side with the f16 merge where the adapter
changes the text. A merge whose delta is missing (zero) or halved fails the same comparison.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from sidecar.demo import QUESTIONS
from tests.sidecar_proc import HOOKED_ARGV, Sidecar
from tests.test_export import (FACT, export, leftovers, llama, llama_cpp_runs, plain_adapter,  # noqa: F401 - fixtures
                               smol_sidecar, text_ids)

QUANTIZED = ["q4_0", "q4_k_m"]
FILE_TYPES = {"q4_0": 2, "q4_k_m": 15}  # llama_ftype MOSTLY_Q4_0, MOSTLY_Q4_K_M

# Tolerances, from a run on the demo adapter (|Δ| per token, nat; "bare" = the quantized bare base
# against the base, "merge" = the quantized merge against the f16 merge, 93 tokens; × = of bare):
#   q4_0    bare mean 0.857 p95 2.43 | merge mean 0.772 p95 3.12 (0.90×, 1.28×)
#           zero delta 2.33×, 3.63× | half delta 1.18×, 1.52×
#   q4_k_m  bare mean 0.329 p95 1.27 | merge mean 0.384 p95 1.81 (1.17×, 1.42×)
#           zero delta 5.78×, 6.30× | half delta 2.68×, 2.40×
# and on the 46 tokens the adapter moves by >= 1 nat, the share where the quantized file is nearer the
# f16 merge than the base: merge 0.74 / 0.96, zero delta 0.17 / 0.09, half 0.59 / 0.59 (the bare
# base, the same way round, sides with the base on 0.83 / 0.91: quantization flips <= 17 %).
MEAN_SLACK = 1.75
P95_SLACK = 2.5
EPSILON = 0.02
EFFECT_NAT = 1.0
MIN_SIDING = 2 / 3


def compare_quantized(base, bare_q, merged, merged_q) -> tuple[list[str], dict[str, float]]:
    """(problems, figures): the quantized merge against the f16 merge, measured against the gap the
    same quantization opens on the bare base."""
    base, bare_q, merged, merged_q = (np.asarray(x, dtype=np.float64) for x in (base, bare_q, merged, merged_q))
    bare, gap = np.abs(bare_q - base), np.abs(merged_q - merged)
    moved = np.abs(merged - base) >= EFFECT_NAT
    siding = float(np.mean(gap[moved] < np.abs(merged_q - base)[moved]))
    stats = {"bareMean": float(bare.mean()), "bareP95": float(np.quantile(bare, 0.95)), "bareMax": float(bare.max()),
             "mean": float(gap.mean()), "p95": float(np.quantile(gap, 0.95)), "max": float(gap.max()),
             "effectMax": float(np.abs(merged - base).max()), "movedTokens": int(moved.sum()), "siding": siding}
    problems = []
    if stats["mean"] > MEAN_SLACK * stats["bareMean"] + EPSILON:
        problems.append(f"mean gap {stats['mean']:.3f} > {MEAN_SLACK} x bare {stats['bareMean']:.3f} + {EPSILON}")
    if stats["p95"] > P95_SLACK * stats["bareP95"] + EPSILON:
        problems.append(f"p95 gap {stats['p95']:.3f} > {P95_SLACK} x bare {stats['bareP95']:.3f} + {EPSILON}")
    if siding < MIN_SIDING:
        problems.append(f"nearer the f16 merge than the base on {siding:.2f} of the tokens the adapter moves "
                        f"(< {MIN_SIDING:.2f})")
    return problems, stats


def scaled_copy(adapter: Path, where: Path, factor: float) -> Path:
    """The adapter with every lora_B multiplied by ``factor`` (0: the bare base through the same path)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, where)
    weights_file = where / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()}, str(weights_file))
    return where


@pytest.fixture(scope="module")
def exported(smol_sidecar, plain_adapter, tmp_path_factory) -> dict[str, dict]:
    """name → ExportResult of the merges this module compares, all through the real sidecar."""
    out = tmp_path_factory.mktemp("quantized")
    zero = scaled_copy(plain_adapter, out / "zero-adapter", 0.0)
    half = scaled_copy(plain_adapter, out / "half-adapter", 0.5)
    cases = [("merged-f16", plain_adapter, "f16")] + [(f"merged-{q}", plain_adapter, q) for q in QUANTIZED] + \
        [(f"bare-{q}", zero, q) for q in QUANTIZED] + [("half-q4_k_m", half, "q4_k_m")]
    results = {}
    for name, adapter, out_type in cases:
        response = export(smol_sidecar, adapter, "merged-gguf", outType=out_type, outputPath=str(out / f"{name}.gguf"))
        assert "result" in response, response
        results[name] = response["result"]
        print(name, f"{results[name]['bytes'] / 2**20:.1f} MiB", f"{results[name]['durationMs']} ms")
    assert leftovers(out) == []  # no intermediate stays behind
    return results


@pytest.fixture(scope="module")
def answers(exported, text_ids) -> dict[str, dict]:
    """llama.cpp's answers, in one fresh process: teacher-forced log-probabilities of every file and
    of the base, and the demo question on the quantized merges."""
    from sidecar.models import embedded_gguf_path

    files = {"base": str(embedded_gguf_path()), **{k: v["outputPath"] for k, v in exported.items()}}
    chats = [f"merged-{q}" for q in QUANTIZED]
    got = llama([{"model": path, "ids": text_ids} for path in files.values()] +
                [{"model": files[name], "chat": QUESTIONS[0]} for name in chats])
    out = {name: {"logprobs": np.asarray(a["logprobs"])} for name, a in zip(files, got)}
    for name, a in zip(chats, got[len(files):]):
        out[name]["text"] = a["text"]
    return out


def comparison(answers: dict, quantized_merge: str, out_type: str) -> tuple[list[str], dict[str, float]]:
    lp = {name: a["logprobs"] for name, a in answers.items()}
    return compare_quantized(lp["base"], lp[f"bare-{out_type}"], lp["merged-f16"], lp[quantized_merge])


@pytest.mark.smollm2
@pytest.mark.usefixtures("llama_cpp_runs")
class TestQuantizedMerge:
    @pytest.mark.parametrize("out_type", QUANTIZED)
    def test_the_quantized_merge_is_within_the_quantization_gap_of_the_f16_merge(self, answers, out_type):
        problems, stats = comparison(answers, f"merged-{out_type}", out_type)
        print(out_type, "merge", json.dumps({k: round(v, 3) for k, v in stats.items()}))
        assert stats["effectMax"] > 5.0 and stats["movedTokens"] >= 20  # the adapter changes the text a lot
        assert problems == [], (problems, stats)

    @pytest.mark.parametrize("out_type", QUANTIZED)
    def test_a_quantized_merge_without_the_delta_fails_the_comparison(self, answers, out_type):
        """Planted: the quantized bare base (the adapter with its deltas zeroed) in place of the merge."""
        problems, stats = comparison(answers, f"bare-{out_type}", out_type)
        print(out_type, "zero delta", json.dumps({k: round(v, 3) for k, v in stats.items()}))
        assert len(problems) == 3, (problems, stats)  # every criterion, not a near miss

    def test_a_half_delta_fails_the_comparison(self, answers):
        """Planted near miss: the delta at half its scale (q4_k_m, whose bare gap is the tighter)."""
        problems, stats = comparison(answers, "half-q4_k_m", "q4_k_m")
        print("q4_k_m half delta", json.dumps({k: round(v, 3) for k, v in stats.items()}))
        assert problems, stats

    @pytest.mark.parametrize("out_type", QUANTIZED)
    def test_the_quantized_merge_answers_with_the_adapter(self, answers, out_type):
        assert FACT in answers[f"merged-{out_type}"]["text"], answers[f"merged-{out_type}"]

    @pytest.mark.parametrize("out_type", QUANTIZED)
    def test_the_file_holds_llama_cpp_types_and_the_base_metadata(self, exported, smol_sidecar, plain_adapter,
                                                                  out_type):
        from gguf import GGUFReader

        from sidecar.models import embedded_gguf_path

        result = exported[f"merged-{out_type}"]
        assert result["outType"] == out_type and result["adaptedWeights"] == 30 * 7
        merged, base = GGUFReader(result["outputPath"]), GGUFReader(str(embedded_gguf_path()))
        assert merged.get_field("general.file_type").contents() == FILE_TYPES[out_type]
        types = {t.tensor_type.name for t in merged.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
        # every weight quantized by llama.cpp's rules from unquantized values: none of the base's Q4_1 is left
        assert types == ({"Q4_0"} if out_type == "q4_0" else {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}), types
        skip = ("general.file_type", "general.quantization_version", "GGUF.kv_count")
        assert {k for k in merged.fields if k not in skip} == {k for k in base.fields if k not in skip}
        for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.rope.freq_base"):
            assert merged.get_field(key).contents() == base.get_field(key).contents(), key
        assert result["bytes"] < 0.5 * exported["merged-f16"]["bytes"]
        recorded = json.loads((plain_adapter / "training_manifest.json").read_text())["exports"]
        assert any(e["outType"] == out_type and e["sha256"] == result["sha256"] for e in recorded)
        # llama.cpp's log went to the sidecar's stderr; stdout carried protocol messages only
        assert f"as {out_type}:" in smol_sidecar.stderr() and smol_sidecar.bad_output == []


@pytest.mark.smollm2
def test_without_llama_cpp_the_quantized_types_are_refused_and_q8_0_still_works(plain_adapter, tmp_path):
    proc = Sidecar(HOOKED_ARGV, env={"LORA_SIDECAR_TEST_NO_LLAMA_CPP": "1"})
    try:
        target = tmp_path / "q4.gguf"
        error = export(proc, plain_adapter, "merged-gguf", outType="q4_k_m", outputPath=str(target))["error"]
        assert error["code"] == -32030 and error["data"]["reason"] == "no-quantizer", error
        assert error["data"]["outType"] == "q4_k_m" and "q4_0" in error["data"]["needs"], error
        for hint in ("bootstrap/bootstrap.sh --dev", "pip install llama-cpp-python", "q8_0 work without it"):
            assert hint in error["message"], error["message"]
        assert not target.exists() and leftovers(tmp_path) == []
        for fmt in ("gguf-lora", "merged"):  # the quantized types are merged-gguf's only
            wrong = export(proc, plain_adapter, fmt, outType="q4_0", outputPath=str(tmp_path / fmt))["error"]
            assert wrong["code"] == -32602 and "q4_0" in wrong["message"] and "f16" in wrong["message"], wrong
        result = export(proc, plain_adapter, "merged-gguf", outType="q8_0", outputPath=str(tmp_path / "q8.gguf"))
        assert result["result"]["outType"] == "q8_0", result
    finally:
        assert proc.close(timeout=120) == 0
    assert proc.bad_output == []


@pytest.mark.smollm2
def test_a_failed_quantization_leaves_nothing_behind(plain_adapter, tmp_path, monkeypatch):
    """llama.cpp failing (a real failure: it is handed a file that is not a GGUF model, and says so)
    after the intermediate was written: ExportFailed with llama.cpp's reason, no intermediate, no output."""
    from sidecar import errors
    from sidecar.adapters import quantize
    from sidecar.adapters.export import export_adapter

    real, seen = quantize.quantize, []

    def on_broken_input(source: Path, target: Path, out_type: str, threads: int) -> None:
        seen.append(source.stat().st_size)
        broken = source.with_name(source.name + ".broken")
        broken.write_bytes(b"not a gguf file")
        try:
            real(broken, target, out_type, threads)
        finally:
            broken.unlink()

    monkeypatch.setattr(quantize, "quantize", on_broken_input)
    out = tmp_path / "out"
    with pytest.raises(errors.ExportFailed, match="llama_model_quantize returned") as caught:
        export_adapter(copy_of(plain_adapter, tmp_path), "merged-gguf", out_type="q4_0",
                       output_path=str(out / "m.gguf"))
    print(caught.value.message)
    assert "gguf" in caught.value.message.lower()  # llama.cpp's own words about the file
    assert seen and seen[0] > 100 * 2**20  # the f16 intermediate was written in full
    assert not (out / "m.gguf").exists() and leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == []


@pytest.mark.smollm2
def test_an_export_killed_while_writing_the_intermediate_is_cleaned_up_at_the_next_start(plain_adapter, tmp_path):
    """kill -9 of the sidecar while it writes the f16 intermediate (as large as the model in f16: 14 GB
    for a 7B base): what it wrote stays until the next sidecar starts, which removes it because the
    export had claimed its temporary names (housekeeping). The default target, inside the adapter."""
    adapter = copy_of(plain_adapter, tmp_path)
    exports, env = adapter / "exports", {"LORA_SIDECAR_DATA": str(tmp_path / "data")}
    with Sidecar(env=env) as proc:
        proc.call("status")
        proc.request("adapters/export", {"adapterPath": str(adapter), "format": "merged-gguf", "outType": "q4_0"})
        deadline = time.monotonic() + 300
        while not any(".f16-" in name for name in leftovers(exports)):
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.stderr()[-3000:]
            time.sleep(0.005)
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
    left = leftovers(exports)
    assert any(".f16-" in name for name in left) and not [p for p in exports.iterdir() if p.name not in left], left
    with Sidecar(env=env) as proc:
        proc.call("status")
        assert list(exports.iterdir()) == [], sorted(p.name for p in exports.iterdir())
        assert f"removed {len(left)} temporary file" in proc.stderr(), proc.stderr()[-3000:]
        assert proc.close() == 0
    print(f"killed with {left} in {exports}; removed at the next start")


@pytest.mark.smollm2
def test_the_disk_estimate_is_the_peak_the_merges_hold(exported, plain_adapter, tmp_path):
    """diskspace.needed_bytes against what the exports wrote: an f16 merge exactly (the writer's own
    layout, slack aside); a q4_0 / q4_k_m merge within -10 % / +30 % of the f16 intermediate plus the
    file llama.cpp wrote (the output is counted at nominal bits per weight). Planted: the estimate
    without its intermediate falls far outside that band."""
    from sidecar.adapters import diskspace, merge_gguf
    from sidecar.adapters.export import _gguf_layout
    from sidecar.adapters.source import read_adapter, resolve_base

    source = read_adapter(plain_adapter)
    base = resolve_base(source)
    config, checkpoint = merge_gguf.gguf_base_config(source, base, "merged-gguf")
    layout = _gguf_layout(source, base, config, checkpoint, "merged-gguf")

    def need(out_type: str) -> int:
        return diskspace.needed_bytes(source, base, layout, "merged-gguf", out_type)

    f16 = exported["merged-f16"]["bytes"]
    assert abs(need("f16") - diskspace.SLACK - f16) <= 2**20, (need("f16"), f16)
    intermediate = tmp_path / "intermediate.gguf"
    merge_gguf.write_with_deltas(base.gguf_path, layout, merge_gguf.factor_deltas(source, layout), intermediate,
                                 merge_gguf.INTERMEDIATE, dequantize=True)
    for out_type in QUANTIZED:
        peak = intermediate.stat().st_size + exported[f"merged-{out_type}"]["bytes"]
        ratio = need(out_type) / peak
        without_intermediate = (need(out_type) - intermediate.stat().st_size) / peak
        print(f"{out_type}: estimate {need(out_type) / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB ({ratio:.3f}x); "
              f"without the intermediate {without_intermediate:.3f}x")
        assert 0.9 <= ratio <= 1.3, ratio
        assert not 0.9 <= without_intermediate <= 1.3, without_intermediate


@pytest.mark.smollm2
def test_an_export_that_cannot_fit_is_refused_before_anything_is_written(plain_adapter, tmp_path):
    """Every file system reports 64 MiB free (test hook): the merges (233 MiB and more) are refused with
    what they need and what is free; a gguf-lora export, a few MiB, still goes through."""
    free = 64 * 2**20
    proc = Sidecar(HOOKED_ARGV, env={"LORA_SIDECAR_TEST_FREE_BYTES": str(free)})
    try:
        for fmt, out_type in (("merged-gguf", "q4_0"), ("merged-gguf", "f16"), ("merged", "f16")):
            target = tmp_path / f"{fmt}-{out_type}"
            error = export(proc, plain_adapter, fmt, outType=out_type, outputPath=str(target))["error"]
            assert error["code"] == -32030 and error["data"]["reason"] == "disk-space", error
            assert error["data"]["freeBytes"] == free < error["data"]["needBytes"], error
            assert error["data"]["path"] == str(tmp_path) and "outputPath" in error["message"], error
            assert not target.exists() and leftovers(tmp_path) == []
        small = export(proc, plain_adapter, "gguf-lora", outputPath=str(tmp_path / "lora.gguf"))
        assert "result" in small and small["result"]["bytes"] < free, small
    finally:
        assert proc.close(timeout=120) == 0
    assert proc.bad_output == []


def copy_of(adapter: Path, where: Path) -> Path:
    return Path(shutil.copytree(adapter, where / "adapter"))
