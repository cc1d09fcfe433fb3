"""Background jobs through the real process on the tiny model (issue 21, items 1-3): ``priority``
read back from the OS for every thread, ``pause`` / ``resume`` (an adapter equal to an
uninterrupted run's, no CPU while paused, a queued job held, cancel of a paused job, the journal),
``yield`` under a planted busy process, ``release`` dropping and rebuilding the bf16 weight copies, and
the background process's own warm models in ``status`` and ``models/unload``.

No wall-clock bounds: CPU use is read from the OS's accounting (/proc/<pid>/stat), orderings and
step numbers instead of times. Linux only (/proc, SCHED_IDLE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sidecar_proc import HOOKED_ARGV, Sidecar, chat_dataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and SCHED_IDLE")

TOL = 1e-6
"""fp32: a paused-and-resumed run does the very same operations in the same order as an uninterrupted
one, so the adapters are equal to float32 rounding; 1e-6 holds with room (observed: 0)."""
TICK = os.sysconf("SC_CLK_TCK")


def params(model: Path, out: Path, **extra) -> dict:
    # Several micro-batches a step (microBatchTokens), so a pause lands inside a step.
    return {"baseModel": str(model), "dataset": chat_dataset(8), "outputPath": str(out), "maxSteps": 8,
            "batchSize": 4, "microBatchTokens": 64, "dtype": "float32", "progressInterval": 0, **extra}


def long_params(model: Path, out: Path, **extra) -> dict:
    return params(model, out, maxSteps=100_000, epochs=1000, **extra)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("background-data")


@pytest.fixture(scope="module")
def sidecar(data_dir):
    proc = Sidecar(env={"LORA_SIDECAR_DATA": str(data_dir)})
    yield proc
    proc.kill()


def progress_of(proc: Sidecar, job_id: str, phase: str, min_step: int = 0, timeout: float = 180) -> dict:
    return proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == job_id
                         and m["params"]["phase"] == phase and m["params"]["step"] >= min_step, timeout)["params"]


def cpu_ticks(pid: int) -> int:
    """utime + stime of a whole process, in clock ticks (the OS's own accounting)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def cores_used(pid: int, seconds: float = 3.0) -> float:
    before, t0 = cpu_ticks(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_ticks(pid) - before) / TICK / (time.monotonic() - t0)


def children(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------

def test_pause_with_release_then_resume_equals_an_uninterrupted_run(sidecar, tiny_model_dir, tmp_path):
    plain = sidecar.call("train", params(tiny_model_dir, tmp_path / "plain", jobId="plain"), timeout=300)
    assert "result" in plain, plain
    # A planted error: one step fewer (what a pause that lost or skipped work would give) must fail the check.
    short = sidecar.call("train", params(tiny_model_dir, tmp_path / "short", jobId="short", maxSteps=7), timeout=300)
    assert "result" in short, short

    rid = sidecar.request("train", params(tiny_model_dir, tmp_path / "paused", jobId="paused",
                                          checkpointEvery=1000))
    progress_of(sidecar, "paused", "training", min_step=2)
    answer = sidecar.call("pause", {"jobId": "paused", "release": True}, timeout=120)["result"]
    assert answer["state"] == "paused" and answer["released"], answer
    assert answer["step"] >= 2
    # release inside a step checkpoints the step before it (checkpointing is on: checkpointEvery)
    assert answer["checkpoint"]["step"] == answer["step"], answer
    note = progress_of(sidecar, "paused", "paused")
    assert note["pausedBy"] == "client" and note["priority"] == "normal"
    running = sidecar.call("status")["result"]["running"]
    assert running["jobId"] == "paused" and running["state"] == "paused" and running["pausedBy"] == "client"
    time.sleep(0.5)
    again = sidecar.call("pause", {"jobId": "paused"})["result"]  # pausing a paused job answers the same
    assert again["state"] == "paused" and again["step"] == answer["step"]
    assert sidecar.call("resume", {"jobId": "paused"})["result"]["state"] == "running"
    done = sidecar.response(rid, timeout=300)
    assert "result" in done, done
    steps = [p["step"] for p in sidecar.progress("paused") if p["phase"] == "training"]
    assert steps == sorted(steps) and max(steps) == 8

    a, b, c = (adapter_tensors(tmp_path / n) for n in ("plain", "paused", "short"))
    assert max_diff(a, b) <= TOL
    assert max_diff(a, c) > 10 * TOL  # the effect floor: the check can fail


def test_a_paused_job_uses_no_cpu(sidecar, tiny_model_dir, tmp_path):
    rid = sidecar.request("train", long_params(tiny_model_dir, tmp_path / "idle", jobId="idle"))
    progress_of(sidecar, "idle", "training", min_step=1)
    pid = sidecar.proc.pid
    running = cores_used(pid)
    assert sidecar.call("pause", {"jobId": "idle"}, timeout=120)["result"]["state"] == "paused"
    paused = cores_used(pid)
    print(f"sidecar CPU: {running:.3f} cores training, {paused:.4f} cores paused")
    assert running > 0.3  # the same measurement sees a working job (the check can fail)
    assert paused < 0.01
    sidecar.call("cancel", {"jobId": "idle"})
    assert sidecar.response(rid, timeout=120)["error"]["code"] == -32800


def test_queued_job_is_held_and_a_paused_job_can_be_cancelled(sidecar, data_dir, tiny_model_dir, tmp_path):
    first = sidecar.request("train", long_params(tiny_model_dir, tmp_path / "a", jobId="hold-a",
                                                 checkpointEvery=2))
    progress_of(sidecar, "hold-a", "training", min_step=3)
    second = sidecar.request("train", params(tiny_model_dir, tmp_path / "b", jobId="hold-b"))
    progress_of(sidecar, "hold-b", "queued")
    held = sidecar.call("pause", {"jobId": "hold-b"})["result"]
    assert (held["jobId"], held["state"], held["step"], held.get("released", False)) == ("hold-b", "paused", 0, False)
    third = sidecar.request("train", params(tiny_model_dir, tmp_path / "c", jobId="hold-c"))
    progress_of(sidecar, "hold-c", "queued")

    # the running job, paused; its journal entry says so
    assert sidecar.call("pause", {"jobId": "hold-a"}, timeout=120)["result"]["state"] == "paused"
    entry = json.loads(next((data_dir / "jobs").glob("hold-a*.json")).read_text())
    assert entry["state"] == "paused"
    cancelled = sidecar.call("cancel", {"jobId": "hold-a"})["result"]
    assert cancelled["state"] == "cancelling"
    error = sidecar.response(first, timeout=120)["error"]
    assert error["code"] == -32800 and error["data"]["stepsCompleted"] >= 3

    # the held job stays queued while the one behind it runs
    assert "result" in sidecar.response(third, timeout=300)
    status = sidecar.call("status")["result"]
    assert [(j["jobId"], j["state"]) for j in status["queued"]] == [("hold-b", "paused")]
    assert not (tmp_path / "b").exists()
    assert sidecar.call("resume", {"jobId": "hold-b"})["result"]["state"] == "queued"
    assert "result" in sidecar.response(second, timeout=300)
    order = [m["id"] for m in sidecar.all if isinstance(m, dict) and m.get("id") in (second, third)
             and "method" not in m]
    assert order == [third, second]


def test_pause_errors_name_the_job(sidecar, tiny_model_dir, tmp_path):
    unknown = sidecar.call("pause", {"jobId": "no-such-job"})["error"]
    assert unknown["code"] == -32050 and unknown["data"]["jobId"] == "no-such-job"
    assert sidecar.call("resume", {"jobId": "no-such-job"})["error"]["code"] == -32050
    sidecar.call("train", params(tiny_model_dir, tmp_path / "done", jobId="done", maxSteps=1), timeout=300)
    ended = sidecar.call("pause", {"jobId": "done"})["error"]
    assert ended["code"] == -32051 and ended["data"]["state"] == "completed"
    bad = sidecar.call("pause", {"jobId": "done", "release": "yes"})["error"]
    assert bad["code"] == -32602


def test_background_job_runs_every_thread_at_sched_idle(sidecar, tiny_model_dir, tmp_path):
    from sidecar.training.priority import io_class, thread_policies

    rid = sidecar.request("train", long_params(tiny_model_dir, tmp_path / "bg", jobId="bg", priority="background",
                                               threads=2))
    note = progress_of(sidecar, "bg", "training", min_step=2)
    assert note["priority"] == "background" and note["threads"] == 2
    (child,) = children(sidecar.proc.pid)
    policies = thread_policies(child)
    print(f"background process {child}: {len(policies)} threads {sorted(set(policies.values()))}")
    assert len(policies) >= 3  # main, control reader and torch's OpenMP worker at least
    assert set(policies.values()) == {"SCHED_IDLE"}
    assert {io_class(tid) for tid in policies} == {3}  # IOPRIO_CLASS_IDLE
    # the same read-back on the sidecar itself sees normal threads (the check can fail)
    assert "SCHED_OTHER" in thread_policies(sidecar.proc.pid).values()
    status = sidecar.call("status")["result"]["running"]
    assert status["priority"] == "background" and status["threads"] == 2

    # pause and resume reach the job in its process; paused, that process uses no CPU
    assert sidecar.call("pause", {"jobId": "bg"}, timeout=120)["result"]["state"] == "paused"
    paused = cores_used(child)
    print(f"background process CPU while paused: {paused:.4f} cores")
    assert paused < 0.01
    step = sidecar.call("status")["result"]["running"]["step"]
    assert sidecar.call("resume", {"jobId": "bg"})["result"]["state"] == "running"
    progress_of(sidecar, "bg", "training", min_step=step + 1)
    sidecar.call("cancel", {"jobId": "bg"})
    assert sidecar.response(rid, timeout=120)["error"]["code"] == -32800


def test_background_job_completes_with_its_priority_in_the_manifest(sidecar, tiny_model_dir, tmp_path):
    response = sidecar.call("train", params(tiny_model_dir, tmp_path / "bgdone", jobId="bgdone",
                                            priority="background"), timeout=300)
    assert "result" in response, response
    manifest = json.loads(Path(response["result"]["manifestPath"]).read_text())
    assert '"priority": "background"' in json.dumps(manifest)


def test_yield_pauses_while_every_core_is_busy_and_resumes_after(sidecar, tiny_model_dir, tmp_path):
    rid = sidecar.request("train", long_params(tiny_model_dir, tmp_path / "y", jobId="yield", priority="background",
                                               **{"yield": {"whenBusy": True, "holdSeconds": 0.5}}))
    progress_of(sidecar, "yield", "training", min_step=1)
    start = len(sidecar.all)
    # The planted busy processes: one spinning loop per core, at normal priority.
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        note = progress_of(sidecar, "yield", "paused", timeout=120)
        assert note["pausedBy"] == "busy"
        assert sidecar.call("status")["result"]["running"]["state"] == "paused"
    finally:
        for p in busy:
            p.kill()
            p.wait()
    resumed = sidecar.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == "yield"
                               and m["params"]["phase"] == "training" and m["params"].get("message") == "resumed",
                               timeout=120)["params"]
    progress_of(sidecar, "yield", "training", min_step=resumed["step"] + 1)
    assert sidecar.index_of(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == "yield"
                            and m["params"]["phase"] == "paused") >= start
    sidecar.call("cancel", {"jobId": "yield"})
    assert sidecar.response(rid, timeout=120)["error"]["code"] == -32800


# ---------------------------------------------------------------------------------------------
# pause {release}: the bf16 weight copies (training/bf16.py) go, and come back on resume
# ---------------------------------------------------------------------------------------------

def test_release_and_rebuild_of_the_bf16_copies_in_process(tiny_model_dir):
    """In process, on the layers themselves: a release drops every copy (the layers' references and
    the store's), a rebuild makes the same ones again (the same logits, exactly), and a planted resume
    that does not rebuild them cannot compute at all."""
    import torch
    from transformers import AutoModelForCausalLM

    from sidecar.training import bf16

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval().requires_grad_(False)
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
        store: dict = {}
        with bf16.bf16_matmuls(model, store) as layers:
            before = model(input_ids=ids).logits
            kept = sum(t.numel() * t.element_size() for _, t in store["bf16_weights"].values())
            assert layers > 0 and kept > 0
            assert bf16.release_copies() == kept
            (patch,) = bf16._ACTIVE
            assert "bf16_weights" not in store and all(m._bf16_weight is None for m in patch.modules)
            with pytest.raises(TypeError):  # the planted error: resumed without rebuilding them
                model(input_ids=ids)
            assert bf16.rebuild_copies() == layers
            assert sum(t.numel() * t.element_size() for _, t in store["bf16_weights"].values()) == kept
            after = model(input_ids=ids).logits
        assert bf16._ACTIVE == []
    assert torch.equal(before, after)
    assert float((before - fp32).abs().max()) > 10 * TOL  # effect floor: the copies are in use


def warm_of(proc: Sidecar, model: Path, held_by: str) -> dict:
    models = proc.call("status")["result"]["models"]
    found = [m for m in models if Path(m["path"]).resolve() == model.resolve() and m["heldBy"] == held_by]
    assert len(found) == 1, models
    return found[0]


def test_release_frees_the_bf16_copies_and_resume_rebuilds_them(tiny_model_dir, tmp_path):
    """``dtype: auto`` with native bf16 (made so on any host by the test hook): while a released pause
    holds the job, ``status`` reports no bf16 copies on its base; after resume they are back, and the
    adapter equals an uninterrupted bf16-matmul run's (the same copies, the same operations: observed 0).
    A resume that did not rebuild them fails the job (in-process test above); one that went on in fp32
    would differ by the effect floor checked last (an fp32 run's adapter)."""
    proc = Sidecar(argv=HOOKED_ARGV, env={"LORA_SIDECAR_DATA": str(tmp_path / "data"),
                                          "LORA_SIDECAR_TEST_NATIVE_BF16": "1"})
    try:
        def auto(name: str, **extra) -> dict:
            return params(tiny_model_dir, tmp_path / name, jobId=name, dtype="auto", **extra)

        assert "result" in proc.call("train", auto("plain16"), timeout=300)
        kept = warm_of(proc, tiny_model_dir, "sidecar")["bf16CopyBytes"]
        assert kept > 0
        rid = proc.request("train", auto("paused16", checkpointEvery=1000))
        progress_of(proc, "paused16", "training", min_step=2)
        answer = proc.call("pause", {"jobId": "paused16", "release": True}, timeout=120)["result"]
        assert answer["state"] == "paused" and answer["released"], answer
        held = warm_of(proc, tiny_model_dir, "sidecar")
        assert held["bf16CopyBytes"] == 0 and held["totalBytes"] == held["weightsBytes"], held
        assert proc.call("resume", {"jobId": "paused16"})["result"]["state"] == "running"
        done = proc.response(rid, timeout=300)
        assert "result" in done, done
        assert warm_of(proc, tiny_model_dir, "sidecar")["bf16CopyBytes"] == kept
        assert "result" in proc.call("train", params(tiny_model_dir, tmp_path / "fp32", jobId="fp32"), timeout=300)
    finally:
        proc.close()
    a, b, c = (adapter_tensors(tmp_path / n) for n in ("plain16", "paused16", "fp32"))
    assert max_diff(a, b) <= TOL
    assert max_diff(a, c) > 10 * TOL


# ---------------------------------------------------------------------------------------------
# The background process's own model cache: status, models/unload, release
# ---------------------------------------------------------------------------------------------

def test_background_process_models_in_status_unload_and_release(tiny_model_dir, tmp_path):
    """The background job process's warm model shows in ``status.models`` (``heldBy: background``);
    ``models/unload`` is refused while its job needs it and then unloads it there; a released pause
    drops its bf16 copies in that process (on a CPU with native bf16, where a background job takes
    bf16 matmuls; the process cannot take the test hook)."""
    from sidecar.models import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    proc = Sidecar(env={"LORA_SIDECAR_DATA": str(tmp_path / "data")})
    try:
        rid = proc.request("train", long_params(tiny_model_dir, tmp_path / "bg", jobId="bgm", priority="background",
                                                dtype="auto", checkpointEvery=1000))
        progress_of(proc, "bgm", "training", min_step=2)
        warm = warm_of(proc, tiny_model_dir, "background")
        assert warm["weightsBytes"] > 0 and warm["residents"] == [] and (warm["bf16CopyBytes"] > 0) == native, warm
        assert not [m for m in proc.call("status")["result"]["models"] if m["heldBy"] == "sidecar"]

        busy = proc.call("models/unload", {"baseModel": str(tiny_model_dir)})["error"]
        assert busy["code"] == -32056 and busy["data"]["jobs"] == ["bgm"], busy

        answer = proc.call("pause", {"jobId": "bgm", "release": True}, timeout=120)["result"]
        assert answer["state"] == "paused" and answer["released"], answer
        held = warm_of(proc, tiny_model_dir, "background")
        assert held["bf16CopyBytes"] == 0 and held["weightsBytes"] == warm["weightsBytes"], held
        assert proc.call("resume", {"jobId": "bgm"})["result"]["state"] == "running"
        progress_of(proc, "bgm", "training", min_step=answer["step"] + 1)
        assert warm_of(proc, tiny_model_dir, "background")["bf16CopyBytes"] == warm["bf16CopyBytes"]
        proc.call("cancel", {"jobId": "bgm"})
        assert proc.response(rid, timeout=120)["error"]["code"] == -32800

        kept = warm_of(proc, tiny_model_dir, "background")  # warm for the next background job
        (child,) = children(proc.proc.pid)
        done = proc.call("models/unload", {"baseModel": str(tiny_model_dir)}, timeout=120)["result"]
        assert [(m["heldBy"], m["totalBytes"]) for m in done["unloaded"]] == [("background", kept["totalBytes"])]
        assert done["bytesFreed"] == kept["totalBytes"]
        assert proc.call("status")["result"]["models"] == []
        assert children(proc.proc.pid) == [child], "the process stays, without the model"
        again = proc.call("models/unload", {"baseModel": str(tiny_model_dir)})["result"]
        assert again["unloaded"] == [] and again["bytesFreed"] == 0
    finally:
        proc.close()
