"""Continuity for worker groups (2 CPU processes on gloo, supervised by the real sidecar): checkpoints,
resume after kill -9 of the sidecar or of one worker, resume on another number of processes, initFrom
and early stopping.

The bar is test_continuity's: a resumed job's adapter equals the uninterrupted job's within 1e-6 (fp32
path, CPU), with the same loss history, and the resumed job executes only the steps after its
checkpoint. The jobs train with dropout 0.1, so each rank's generator states are part of what a
resume must restore: a checkpoint whose two ranks' states are swapped (planted) misses by far more.
Jobs that change the number of processes, and initFrom / early stopping (compared with a single
process), train with dropout 0: dropout masks are drawn per process (docs/SCALING.md).

Every process here computes with one thread (LORA_SIDECAR_THREADS=1; workers get one each).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from sidecar import errors, paths
from sidecar.training import checkpoint
from tests.sidecar_proc import Sidecar, chat_dataset
from tests.test_continuity import (VALIDATION, assert_trained_only_the_rest, chain,  # noqa: F401 (fixture)
                                   max_diff, training_steps_since, weights)
from tests.test_distributed import group_pids, running

TOL = 1e-6  # resume of the same world: exact up to float noise
CROSS_TOL = 1e-5  # another world (number of processes): the same examples summed in another order
STEPS = 24
JOB = {"dataset": chat_dataset(9), "maxSteps": STEPS, "batchSize": 2, "learningRate": 1e-3, "dropout": 0.1,
       "dtype": "float32", "progressInterval": 0, "checkpointEvery": 4, "distributed": {"processes": 2}}


def job(model: Path, out: Path, **extra) -> dict:
    return {"baseModel": str(model), "outputPath": str(out), **JOB, **extra}


def losses(adapter: Path) -> list[float]:
    return json.loads((adapter / "training_metrics.json").read_text())["lossHistory"]


def assert_same_run(result: dict, reference: Path, tol: float = TOL) -> None:
    adapter = Path(result["adapterPath"])
    diff = max_diff(weights(adapter), weights(reference))
    assert diff <= tol, f"adapter differs from the uninterrupted run by {diff}"
    mine, theirs = losses(adapter), losses(reference)
    assert len(mine) == len(theirs) == STEPS
    assert max(abs(a - b) for a, b in zip(mine, theirs)) <= tol


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {"LORA_SIDECAR_DATA": str(tmp_path_factory.mktemp("dist-resume-data")), "LORA_SIDECAR_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(chain, tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted distributed run (no checkpoints), with an effect well above the tolerance."""
    out = tmp_path_factory.mktemp("reference") / "adapter"
    response = chain.current().call("train", job(tiny_model_dir, out, jobId="reference", checkpointEvery=0,
                                                 checkpointSeconds=0), timeout=300)
    assert "result" in response, response
    assert max(t.abs().max().item() for k, t in weights(out).items() if "lora_B" in k) > 100 * TOL
    return out


def checkpointed(job_id: str, step: int):
    return lambda m: (m.get("method") == "progress" and m["params"]["jobId"] == job_id
                      and (m["params"].get("checkpoint") or {}).get("step", 0) >= step)


def resume(proc: Sidecar, job_id: str, **extra) -> tuple[dict, list[int]]:
    since = len(proc.all)
    response = proc.call("train", {"resumeFrom": job_id, "progressInterval": 0, **extra}, timeout=300)
    assert "result" in response, response
    return response["result"], training_steps_since(proc, job_id, since)


def test_kill_9_of_the_sidecar_then_resume_gives_the_uninterrupted_adapter(chain, reference, tiny_model_dir, env,
                                                                           tmp_path):
    job_id = "dist-kill-sidecar"
    proc = chain.current()
    proc.request("train", job(tiny_model_dir, tmp_path / "adapter", jobId=job_id))
    proc.wait_for(checkpointed(job_id, 4), timeout=300)
    launcher, workers = group_pids(proc)
    log = proc.stderr_file.name
    killed = time.monotonic()
    chain.kill()
    # The launcher dies with the sidecar, the workers with the launcher (SIGKILL both: training/distributed.py).
    # Measured 0.01-0.05 s here; the bound is generous for a busy CI host (a process in a disk write dies after it)
    deadline = killed + 30
    while left := [p for p in [launcher, *workers] if running(p)]:
        assert time.monotonic() < deadline, (f"the worker group outlived its sidecar: {left} of launcher {launcher}, "
                                             f"workers {workers}\n" + Path(log).read_text()[-4000:])
        time.sleep(0.1)
    print(f"group gone {time.monotonic() - killed:.2f} s after the kill")
    job_dir = Path(env["LORA_SIDECAR_DATA"]) / "jobs" / paths.job_key(job_id)
    on_disk = [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(job_dir)]
    assert on_disk and on_disk[-1] % 4 == 0 and on_disk[-1] < STEPS, on_disk

    proc = chain.current()
    entry = next(j for j in proc.call("status")["result"]["recent"] if j["jobId"] == job_id)
    assert entry["state"] == "interrupted" and entry["lastCheckpoint"]["step"] == on_disk[-1], entry
    result, steps = resume(proc, job_id)
    assert result["metrics"]["resumedFromStep"] == on_disk[-1]
    assert_trained_only_the_rest(steps, on_disk[-1], total=STEPS)
    assert_same_run(result, reference)
    manifest = json.loads(Path(result["manifestPath"]).read_text())
    assert manifest["engine"]["distributed"]["processes"] == 2 and manifest["resumedFrom"]["step"] == on_disk[-1]
    assert not job_dir.exists(), "a completed job's checkpoints are deleted"


def test_kill_9_of_a_worker_then_resume_and_a_checkpoint_with_swapped_ranks_misses(
        chain, reference, tiny_model_dir, env, tmp_path):
    job_id = "dist-kill-worker"
    proc = chain.current()
    request = proc.request("train", job(tiny_model_dir, tmp_path / "adapter", jobId=job_id))
    proc.wait_for(checkpointed(job_id, 8), timeout=300)
    _, workers = group_pids(proc)
    os.kill(workers[1], signal.SIGKILL)
    error = proc.response(request, timeout=60)["error"]
    assert error["code"] == errors.WorkerDied.CODE and error["data"]["rank"] == 1, error
    job_dir = Path(env["LORA_SIDECAR_DATA"]) / "jobs" / paths.job_key(job_id)
    last = checkpoint.list_checkpoints(job_dir)[-1]
    planted = swapped_ranks_copy(last, tmp_path / "planted")

    result, steps = resume(proc, job_id)
    start = checkpoint.step_of(last)
    assert result["metrics"]["resumedFromStep"] == start >= 8
    assert_trained_only_the_rest(steps, start, total=STEPS)
    assert_same_run(result, reference)

    # The same checkpoint with rank 0's and rank 1's generator states swapped: dropout masks differ.
    response = proc.call("train", {"resumeFrom": str(planted), "jobId": "planted", "progressInterval": 0,
                                   "outputPath": str(tmp_path / "planted-adapter")}, timeout=300)
    assert "result" in response, response
    miss = max_diff(weights(tmp_path / "planted-adapter"), weights(reference))
    print(f"swapped rank generators: adapter off by {miss:.2e}")
    assert miss > 100 * TOL


def swapped_ranks_copy(source: Path, target: Path) -> Path:
    """A copy of checkpoint ``source`` (with its job's params.json beside it) whose RNG file holds the
    two ranks' states in the other order, its recorded size and digest updated to match."""
    target.mkdir()
    shutil.copy(source.parent / checkpoint.PARAMS_FILE, target / checkpoint.PARAMS_FILE)
    copy = target / source.name
    shutil.copytree(source, copy)
    rng = torch.load(copy / checkpoint.RNG_FILE, weights_only=True)
    assert len(rng["ranks"]) == 2
    torch.save({"ranks": rng["ranks"][::-1]}, copy / checkpoint.RNG_FILE)
    content = (copy / checkpoint.RNG_FILE).read_bytes()
    state = json.loads((copy / checkpoint.STATE_FILE).read_text())
    state["files"][checkpoint.RNG_FILE] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (copy / checkpoint.STATE_FILE).write_text(json.dumps(state))
    return copy


@pytest.fixture(scope="module")
def single(chain, tiny_model_dir, tmp_path_factory) -> Path:
    """The single-process run of the same global batch (1 × 4), dropout 0."""
    out = tmp_path_factory.mktemp("single") / "adapter"
    response = chain.current().call("train", job(tiny_model_dir, out, jobId="single-ref", batchSize=4, dropout=0.0,
                                                 distributed=None, checkpointEvery=0, checkpointSeconds=0),
                                    timeout=300)
    assert "result" in response, response
    return out


def cancel_after_checkpoint(proc: Sidecar, params: dict, job_id: str, step: int) -> None:
    request = proc.request("train", {**params, "jobId": job_id})
    proc.wait_for(checkpointed(job_id, step), timeout=300)
    proc.call("cancel", {"jobId": job_id})
    assert proc.response(request, timeout=60)["error"]["code"] == errors.RequestCancelled.CODE


def test_fsdp_checkpoints_gather_the_shards_and_resume_from_them(chain, single, tiny_model_dir, tmp_path):
    proc = chain.current()
    job_id = "fsdp-resume"
    cancel_after_checkpoint(proc, job(tiny_model_dir, tmp_path / "adapter", dropout=0.0,
                                      distributed={"processes": 2, "strategy": "fsdp"}), job_id, 4)
    result, steps = resume(proc, job_id)
    start = result["metrics"]["resumedFromStep"]
    assert start and start % 4 == 0
    assert_trained_only_the_rest(steps, start, total=STEPS)
    assert_same_run(result, single, tol=CROSS_TOL)


def test_resume_on_one_process_when_the_global_batch_stays(chain, single, tiny_model_dir, tmp_path):
    """Checkpointed by 2 processes × batch 2, resumed by 1 process × batch 4: the single-process run's
    adapter. 1 × batch 2 (another global batch) is refused, naming it."""
    proc = chain.current()
    job_id = "dist-to-one"
    cancel_after_checkpoint(proc, job(tiny_model_dir, tmp_path / "adapter", dropout=0.0), job_id, 4)

    error = proc.call("train", {"resumeFrom": job_id, "distributed": None})["error"]
    assert error["code"] == errors.ResumeMismatch.CODE, error
    assert "global batch (batchSize × processes) (4 → 2)" in error["message"], error["message"]
    result, steps = resume(proc, job_id, distributed=None, batchSize=4)
    start = result["metrics"]["resumedFromStep"]
    assert start and start % 4 == 0
    assert_trained_only_the_rest(steps, start, total=STEPS)
    assert any("Resumed on 1 process(es); the checkpoint was written by 2" in w for w in result["warnings"])
    assert_same_run(result, single, tol=CROSS_TOL)
    assert json.loads(Path(result["manifestPath"]).read_text())["engine"].get("distributed") is None


def test_init_from_in_a_worker_group_continues_the_parent(chain, reference, tiny_model_dir, tmp_path):
    proc = chain.current()
    params = job(tiny_model_dir, tmp_path / "x", maxSteps=6, dropout=0.0, initFrom=str(reference),
                 checkpointEvery=0, checkpointSeconds=0)
    dist = proc.call("train", {**params, "outputPath": str(tmp_path / "dist"), "jobId": "dist-init"}, timeout=300)
    single = proc.call("train", {**params, "outputPath": str(tmp_path / "single"), "jobId": "single-init",
                                 "batchSize": 4, "distributed": None}, timeout=300)
    fresh = proc.call("train", {**params, "outputPath": str(tmp_path / "fresh"), "jobId": "dist-fresh",
                                "initFrom": None}, timeout=300)
    for response in (dist, single, fresh):
        assert "result" in response, response
    diff = max_diff(weights(tmp_path / "dist"), weights(tmp_path / "single"))
    planted = max_diff(weights(tmp_path / "fresh"), weights(tmp_path / "single"))
    print(f"initFrom: 2 processes vs 1 process {diff:.2e}; without initFrom {planted:.2e}")
    assert diff <= CROSS_TOL and planted > 100 * CROSS_TOL
    manifest = json.loads((tmp_path / "dist" / "training_manifest.json").read_text())
    assert manifest["parent"]["path"] == str(reference) and manifest["engine"]["distributed"]["processes"] == 2
    assert json.loads((tmp_path / "dist" / "manifest.json").read_text())["source"] == "refined"


def test_early_stopping_stops_every_rank_at_the_same_step(chain, tiny_model_dir, tmp_path):
    """test_continuity's overfitting job (validation loss falls, then rises) on 2 processes × batch 1:
    it stops where the single-process job (1 × batch 2) stops, with the same best step, and writes the
    best step's adapter once — the adapter of the same group trained for exactly that many steps."""
    proc = chain.current()
    params = {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(6), "validationDataset": VALIDATION,
              "maxSteps": 60, "learningRate": 5e-2, "rank": 16, "alpha": 32, "scheduler": "constant",
              "warmupRatio": 0, "dropout": 0.0, "evalEvery": 2, "progressInterval": 0, "dtype": "float32",
              "earlyStopping": {"patience": 3, "minDelta": 0.005}}
    group = {"batchSize": 1, "distributed": {"processes": 2}}
    dist = proc.call("train", {**params, **group, "jobId": "dist-es", "outputPath": str(tmp_path / "dist")},
                     timeout=300)
    single = proc.call("train", {**params, "batchSize": 2, "jobId": "single-es",
                                 "outputPath": str(tmp_path / "single")}, timeout=300)
    for response in (dist, single):
        assert "result" in response, response
    es = [json.loads((tmp_path / name / "training_manifest.json").read_text())["earlyStopping"]
          for name in ("dist", "single")]
    print("early stopping", es)
    assert es[0]["stopped"] and es[0]["stoppedAtStep"] == es[1]["stoppedAtStep"] < 60
    best = es[0]["bestStep"]
    assert best == es[1]["bestStep"] < es[0]["stoppedAtStep"] == dist["result"]["metrics"]["steps"]
    # Not compared within CROSS_TOL: at lr 5e-2 Adam's first steps move a weight whose gradient is
    # near zero by lr · g / (|g| + eps), where the summation order decides (measured: one element of
    # 1024 off by 5e-4 after 2 steps, the rest within 2e-5; the validation losses agree to 1e-15).
    drift = max_diff(weights(tmp_path / "dist"), weights(tmp_path / "single"))
    print(f"2 × 1 vs 1 × 2 at lr 5e-2 after {best} steps: {drift:.2e}")
    assert abs(es[0]["bestValidationLoss"] - es[1]["bestValidationLoss"]) <= CROSS_TOL

    plain = {k: v for k, v in params.items() if k not in ("validationDataset", "earlyStopping", "evalEvery")}
    upto = proc.call("train", {**plain, **group, "maxSteps": best, "jobId": "dist-upto-best",
                               "outputPath": str(tmp_path / "upto")}, timeout=300)
    assert "result" in upto, upto
    assert max_diff(weights(tmp_path / "dist"), weights(tmp_path / "upto")) <= TOL
    # Written once, by rank 0: one adapter directory a job, no temporary ones left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "single", "upto"]
