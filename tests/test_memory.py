"""Memory before and during a job (issue 21, item 4), through the real process.

- ``estimate`` against the peak measured in the process that ran the job: a fresh sidecar runs only
  that job, and its ``metrics.peakMemoryMb`` is the process's ``VmHWM`` (the kernel's own high-water mark
  of its resident set; not ``ru_maxrss``, which also keeps the peak of the pytest process it was
  forked from, see procs.peak_rss_mb) — so the figure compared is the job's whole peak, runtime,
  weights and activations. Tolerance 25 % (the issue's); each model's activations are more than 25 %
  of its peak, so an estimate without them (the planted error) fails the same comparison.
- the memory guard (``LORA_SIDECAR_MEMORY_MARGIN_MB`` forcing a refusal, with both numbers and settings
  that would fit, each of which ``estimate`` then says fits), run off the thread that reads stdin
  (``status`` and ``supports`` answered while the guard and ``estimate`` run);
- ``progress`` carrying ``memory``, ``gradNorm`` (before clipping: equal to an unclipped run's) and
  ``tokenAccuracy`` (equal to a next-token accuracy computed here with transformers);
- ``status`` bytes per warm model and ``models/unload`` (refused while a resident or a job needs the
  base; ``force``; the process's RSS falls by the model's weights).

Linux only (/proc). No wall-clock bounds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.sidecar_proc import Sidecar, chat_dataset, rss_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss")

MIB = 2**20
ESTIMATE_TOL = 0.25
"""The issue's bound: estimate within 25 % of the measured peak (observed: within 6 %; docs/PERFORMANCE.md)."""


def varied_dataset(n: int = 9) -> dict:
    """Chats of different lengths (about 60 to 330 tokens), unlike the uniform ones the estimate's
    coefficients were fitted on, so that batches split at the 512-token micro-batch budget."""
    examples = []
    for i in range(n):
        words = 12 + (i * 23) % 70
        answer = " ".join(f"item{(i * 7 + j) % 97} is listed" for j in range(words))
        examples.append({"messages": [{"role": "user", "content": f"List the things of set {i}."},
                                      {"role": "assistant", "content": answer}]})
    return {"examples": examples}


def build_llama(out: Path, *, hidden: int, layers: int, inter: int, heads: int, kv: int) -> Path:
    """A random Llama with the SmolLM2 tokenizer (as sidecar/testing.py's, in another size)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from sidecar.models import load_embedded_tokenizer, save_tokenizer

    tok = load_embedded_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=True, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> Path:
    """8 layers, hidden 256: activations of the decoder weigh beside the LM head's."""
    return build_llama(tmp_path_factory.mktemp("mid-model"), hidden=256, layers=8, inter=768, heads=8, kv=4)


def fresh(tmp_path: Path, **env: str) -> Sidecar:
    return Sidecar(env={"LORA_SIDECAR_DATA": str(tmp_path / "data"), **env})


def ok(response: dict) -> dict:
    assert "error" not in response, response
    return response["result"]


def estimate_and_measure(model: str, tmp_path: Path, **extra) -> tuple[dict, float]:
    proc = fresh(tmp_path)
    try:
        params = {"baseModel": model, "dataset": varied_dataset(), "outputPath": str(tmp_path / "out"),
                  "maxSteps": 2, "batchSize": 3, "progressInterval": 0, **extra}
        est = ok(proc.call("estimate", params, timeout=600))
        result = ok(proc.call("train", params, timeout=900))
        return est, result["metrics"]["peakMemoryMb"] * MIB
    finally:
        proc.close()


def check_estimate(est: dict, measured: float) -> None:
    parts = ("baseBytes", "loraBytes", "optimizerBytes", "activationBytesPeak", "workspaceBytes")
    assert est["totalBytes"] == sum(est[k] for k in parts)
    error = abs(est["totalBytes"] - measured) / measured
    print(json.dumps({"estimateMiB": est["totalBytes"] / MIB, "measuredMiB": measured / MIB, "error": error}))
    assert error <= ESTIMATE_TOL, (est, measured / MIB)
    # Planted error: the same comparison without the activations must fail (effect floor).
    assert abs(est["totalBytes"] - est["activationBytesPeak"] - measured) / measured > ESTIMATE_TOL


def test_estimate_tiny_model(tiny_model_dir, tmp_path):
    est, measured = estimate_and_measure(str(tiny_model_dir), tmp_path)
    assert est["device"] == "cpu" and est["fits"] and est["peakTokens"] > 0
    check_estimate(est, measured)


def test_estimate_mid_model(mid_model, tmp_path):
    est, measured = estimate_and_measure(str(mid_model), tmp_path, batchSize=4, microBatchTokens=0)
    check_estimate(est, measured)


@pytest.mark.smollm2
@pytest.mark.parametrize("extra", [{}, {"gradientCheckpointing": True, "microBatchTokens": 0}, {"dtype": "float32"}],
                         ids=["auto", "checkpointing", "fp32"])
def test_estimate_smollm2(tmp_path, extra):
    est, measured = estimate_and_measure("default", tmp_path, **extra)
    check_estimate(est, measured)


# ---------------------------------------------------------------------------------------------
# The guard
# ---------------------------------------------------------------------------------------------

def test_guard_refuses_before_anything_loads(mid_model, tmp_path):
    params = {"baseModel": str(mid_model), "dataset": varied_dataset(), "outputPath": str(tmp_path / "out"),
              "maxSteps": 2, "batchSize": 4, "microBatchTokens": 0}
    probe = fresh(tmp_path)
    try:
        est = ok(probe.call("estimate", params, timeout=300))
        small = ok(probe.call("estimate", {**params, "microBatchTokens": 256, "gradientCheckpointing": True}))
    finally:
        probe.close()
    # A margin that leaves less than the job needs: refused, with both numbers and what would fit.
    # The margin sits between the job's estimate and the smallest setting's (one example a micro-batch,
    # checkpointed), so both sides have hundreds of MiB of room against changes in free memory meanwhile.
    assert est["totalBytes"] - small["totalBytes"] > 300 * MIB, (est, small)
    room = (est["availableBytes"] - (est["totalBytes"] + small["totalBytes"]) / 2) / MIB
    proc = fresh(tmp_path, LORA_SIDECAR_MEMORY_MARGIN_MB=str(int(room)))
    try:
        response = proc.call("train", params, timeout=300)
        assert response["error"]["code"] == -32055, response
        data = response["error"]["data"]
        assert data["totalBytes"] == est["totalBytes"] and data["availableBytes"] > 0
        assert data["marginBytes"] == int(room) * MIB
        assert str(round(data["totalBytes"] / MIB)) in response["error"]["message"]
        assert data["suggestions"], data
        # The guard is the job's first act on the worker: queued, then failed, nothing loaded.
        assert [p["phase"] for p in proc.progress()] == ["queued", "failed"], proc.progress()
        status = ok(proc.call("status"))
        assert status["loadedModels"] == [] and status["running"] is None and status["models"] == []
        assert [(j["state"], j["step"]) for j in status["recent"]] == [("failed", 0)], status["recent"]
        # Each suggestion, applied, fits by the same estimate.
        first = data["suggestions"][0]
        applied = dict(params)
        if first.startswith("batchSize"):
            words = first.split()
            applied.update(batchSize=int(words[1]), gradientAccumulation=int(words[4]))
        elif first.startswith("microBatchTokens"):
            applied["microBatchTokens"] = int(first.split()[1])
        assert ok(proc.call("estimate", applied, timeout=300))["fits"], first
        # A huge margin: no setting fits, and the message says so.
        huge = fresh(tmp_path, LORA_SIDECAR_MEMORY_MARGIN_MB="100000000")
        try:
            refused = huge.call("train", params, timeout=300)["error"]
            assert refused["code"] == -32055 and refused["data"]["suggestions"] == []
        finally:
            huge.close()
    finally:
        proc.close()


def test_the_reader_answers_while_a_train_is_guarded_and_an_estimate_runs(tiny_model_dir, tmp_path):
    """The guard and ``estimate`` tokenize the dataset (seconds): neither runs on the thread that reads
    stdin. Structural, no clock: ``status`` sent right behind a guarded ``train`` is answered before the
    train's refusal and shows the job (with the guard at the door, the old place, the job was not
    queued until its estimate ended: ``status`` could not see it); ``supports`` sent behind an
    ``estimate`` is answered before it. The estimate and the guard take one lock, and this fresh
    process imports torch and transformers for the first one: both take seconds, the answers ms."""
    proc = fresh(tmp_path, LORA_SIDECAR_MEMORY_MARGIN_MB="100000000")  # no job fits: the guard refuses
    try:
        params = {"baseModel": str(tiny_model_dir), "dataset": varied_dataset(200), "maxSteps": 1,
                  "outputPath": str(tmp_path / "out"), "jobId": "guarded"}
        train = proc.request("train", params)
        status = proc.request("status")
        est = proc.request("estimate", params)
        supports = proc.request("supports")
        refused = proc.response(train, timeout=300)
        assert refused["error"]["code"] == -32055, refused
        seen = ok(proc.response(status))
        job = seen["running"] or next(iter(seen["queued"]), None)
        assert job is not None and job["jobId"] == "guarded" and job["state"] in ("queued", "running"), seen
        estimated = ok(proc.response(est, timeout=300))
        assert estimated["fits"] is False and estimated["totalBytes"] == refused["error"]["data"]["totalBytes"]
        ok(proc.response(supports))
        order = {name: proc.index_of(lambda m, i=i: m.get("id") == i and "method" not in m)
                 for name, i in (("train", train), ("status", status), ("estimate", est), ("supports", supports))}
        assert order["status"] < order["train"] and order["supports"] < order["estimate"], order
    finally:
        proc.close()


# ---------------------------------------------------------------------------------------------
# progress: memory, gradNorm, tokenAccuracy
# ---------------------------------------------------------------------------------------------

def training_progress(proc: Sidecar, params: dict) -> list[dict]:
    result = ok(proc.call("train", params, timeout=600))
    return [p for p in proc.progress(result["jobId"]) if p["phase"] == "training" and p["step"] > 0]


def test_progress_memory_and_grad_norm(tiny_model_dir, tmp_path):
    proc = fresh(tmp_path)
    try:
        base = {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(8), "maxSteps": 3, "batchSize": 4,
                "dtype": "float32", "progressInterval": 0, "learningRate": 1e-2}
        clipped = training_progress(proc, {**base, "outputPath": str(tmp_path / "a"), "maxGradNorm": 1e-3})
        free = training_progress(proc, {**base, "outputPath": str(tmp_path / "b"), "maxGradNorm": 0})
        pid = proc.proc.pid
        rss_now = rss_bytes(pid) / MIB
    finally:
        proc.close()
    for p in clipped + free:
        assert p["memory"]["rssMb"] > 100 and p["memory"]["deviceAllocatedMb"] is None
        assert math.isfinite(p["gradNorm"]) and 0 <= p["tokenAccuracy"] <= 1
    assert clipped[-1]["memory"]["rssMb"] <= rss_now * 1.5
    # Step 1 is the same computation in both runs (same seed, same data, LoRA B = 0): the norm reported
    # is the one before clipping, so it equals the unclipped run's — and is far above the clip value
    # (what a norm read after clipping would show: 1e-3).
    g1, g2 = clipped[0]["gradNorm"], free[0]["gradNorm"]
    assert clipped[0]["step"] == free[0]["step"] == 1
    assert abs(g1 - g2) <= 1e-5 * g2, (g1, g2)
    assert g1 > 100 * 1e-3


def reference_accuracy(model_dir: Path, dataset: dict) -> tuple[float, float, int]:
    """Next-token accuracy of the bare base over the label tokens (and, the planted error, over every
    token), computed here with transformers on the sidecar's own tokenization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidecar import data, wire
    from sidecar.models import ensure_pad_and_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_and_template(tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = data.load_inline(wire.Dataset(examples=[_example(e) for e in dataset["examples"]]), "dataset")
    items, _ = data.tokenize(records, tok, loss_on="assistant", max_seq_length=1024)
    hit = total = hit_all = total_all = 0
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([item.input_ids])
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
            labels = torch.tensor(item.labels[1:])
            keep = labels != data.IGNORE
            hit += int((pred[keep] == labels[keep]).sum())
            total += int(keep.sum())
            hit_all += int((pred == ids[0, 1:]).sum())
            total_all += len(pred)
    return hit / total, hit_all / total_all, total


def _example(e: dict):
    from sidecar import wire

    return wire.Example(messages=[wire.Message(**m) for m in e["messages"]])


@pytest.mark.smollm2
def test_token_accuracy_matches_transformers(tmp_path):
    """Step 1 of a job over the whole dataset in one batch runs the bare base (LoRA B = 0), so its
    tokenAccuracy is the base model's next-token accuracy on the label tokens. fp32 on both sides; the
    tolerance is one token of the step's (argmax near-ties may fall either way across kernels)."""
    from sidecar.models import ensure_embedded_checkpoint

    dataset = chat_dataset(6)
    proc = fresh(tmp_path)
    try:
        steps = training_progress(proc, {"baseModel": "default", "dataset": dataset, "maxSteps": 1, "batchSize": 6,
                                         "microBatchTokens": 0, "dtype": "float32", "progressInterval": 0,
                                         "outputPath": str(tmp_path / "out")})
    finally:
        proc.close()
    expected, planted, labels = reference_accuracy(ensure_embedded_checkpoint(), dataset)
    got = steps[0]["tokenAccuracy"]
    assert abs(got - expected) <= 1 / labels + 1e-6, (got, expected, labels)
    assert abs(planted - expected) > 10 / labels, "accuracy over every token must differ (effect floor)"


# ---------------------------------------------------------------------------------------------
# status bytes and models/unload
# ---------------------------------------------------------------------------------------------

def safetensors_bytes(model_dir: Path) -> int:
    """The weights' bytes as their file lists them (read without torch)."""
    import struct

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def test_status_bytes_and_unload(mid_model, tmp_path):
    proc = fresh(tmp_path)
    try:
        out = tmp_path / "adapter"
        ok(proc.call("train", {"baseModel": str(mid_model), "dataset": chat_dataset(4), "maxSteps": 1,
                               "dtype": "float32", "outputPath": str(out)}, timeout=600))
        loaded = ok(proc.call("adapters/load", {"path": str(out), "id": "a1", "baseModel": str(mid_model),
                                                "dtype": "float32"}, timeout=300))
        status = ok(proc.call("status"))
        [warm] = status["models"]
        # Tied embeddings: the file stores the tied matrix once, as the loaded model holds it; beside the
        # parameters the model holds buffers (the rotary frequencies: 2 × 16 floats here), at most 1 KiB.
        assert 0 <= warm["weightsBytes"] - safetensors_bytes(mid_model) <= 1024, warm
        assert warm["dtype"] == "float32" and warm["bf16CopyBytes"] == 0
        assert warm["totalBytes"] == warm["weightsBytes"] and warm["residents"] == ["a1"]
        assert [a["bytes"] for a in status["adapters"]["adapters"]] == [loaded["bytes"]]

        refused = proc.call("models/unload", {"baseModel": str(mid_model)})["error"]
        assert refused["code"] == -32056 and refused["data"]["residents"] == ["a1"], refused
        assert ok(proc.call("status"))["models"], "a refusal unloads nothing"

        # A queued/running job that needs the base: refused at the door, naming the job.
        job = proc.request("train", {"baseModel": str(mid_model), "dataset": chat_dataset(8), "maxSteps": 100000,
                                     "dtype": "float32", "outputPath": str(tmp_path / "long"), "jobId": "long-1",
                                     "progressInterval": 0})
        proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == "long-1"
                      and m["params"]["phase"] == "training", 300)
        busy = proc.call("models/unload", {"baseModel": str(mid_model), "force": True})["error"]
        assert busy["code"] == -32056 and busy["data"]["jobs"] == ["long-1"], busy
        ok(proc.call("cancel", {"jobId": "long-1"}))
        assert proc.response(job, 300)["error"]["code"] == -32800

        before = rss_bytes(proc.proc.pid)
        done = ok(proc.call("models/unload", {"baseModel": str(mid_model), "force": True}, timeout=300))
        after = rss_bytes(proc.proc.pid)
        assert done["residentsUnloaded"] == ["a1"] and done["bytesFreed"] == warm["totalBytes"]
        status = ok(proc.call("status"))
        assert status["models"] == [] and status["loadedModels"] == [] and status["adapters"]["adapters"] == []
        # The memory went back to the OS (malloc_trim): at least half the weights' bytes.
        assert before - after >= warm["weightsBytes"] / 2, (before / MIB, after / MIB)
        again = ok(proc.call("models/unload", {"baseModel": str(mid_model)}))
        assert again["unloaded"] == [] and again["bytesFreed"] == 0
    finally:
        proc.close()
