"""Distributed jobs: 2 CPU processes on gloo, started by torchrun, supervised by the real sidecar.

The equality checks run with dropout 0: dropout masks are drawn per process, so with dropout the
two runs differ by construction (docs/SCALING.md).

What each equality can see: the jobs train with AdamW, whose update does not change when every
gradient is scaled by the same factor, so an AdamW comparison catches wrong rows, a wrong loss
denominator per row or a broken stand-in row, but not ranks that sum their gradients instead of
averaging them. ``TestGradientNormalisation`` trains with plain SGD (AdamW swapped for SGD in every
process, the only change) and checks that the two-process adapter is the single-process one at the
same learning rate, and far from the one at twice the learning rate (what summing over 2 ranks gives).

TestWorld runs in-process; everything else drives the real sidecar (or torchrun) as a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.training.world import Part, World
from tests.sidecar_proc import REPO, Sidecar, chat_dataset

TOLERANCE = 1e-5
# 9 examples at a global batch of 4: micro-batches of 4, 4 and 1 rows per epoch. With accumulation 2
# a step is either 8 rows or the single row, where rank 1 has no row and runs the stand-in; the
# micro-batch budget splits each rank's rows further, so gradients accumulate under no_sync.
# dtype float32: a single-process job on a CPU with native bf16 would otherwise take bf16 matmuls
# (training/bf16.py), which worker groups never do; the comparison is of the fp32 path.
JOB = {"dataset": chat_dataset(9), "maxSteps": 4, "gradientAccumulation": 2, "microBatchTokens": 40,
       "dropout": 0.0, "progressInterval": 0, "dtype": "float32"}
PHASES = ["queued", "loading", "preparing", "training", "saving", "completed"]


def distributed_params(model: Path, out: Path, **extra) -> dict:
    return {"baseModel": str(model), "outputPath": str(out), **JOB, "batchSize": 2,
            "distributed": {"processes": 2}, **extra}


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_single_process_adapter(out: Path, reference: Path, sidecar, model: Path, tmp_path: Path, what: str) -> None:
    """``out`` is the single-process adapter ``reference`` (batchSize 4) within TOLERANCE, its B moved
    well beyond it, and the same comparison fails for the single-process job at twice the learning
    rate (planted: what ranks summing their gradients instead of averaging would give under SGD)."""
    diff = max_difference(adapter(out), adapter(reference))
    print(f"{what} vs 1 process: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert max(t.abs().max().item() for k, t in adapter(out).items() if "lora_B" in k) > 10 * TOLERANCE
    planted = tmp_path / "planted"
    response = sidecar.call("train", {"baseModel": str(model), "outputPath": str(planted), **JOB, "batchSize": 4,
                                      "learningRate": 4e-4, "jobId": "planted"}, timeout=300)
    assert "result" in response, response
    reference_lr = json.loads((reference / "training_manifest.json").read_text())["hyperparameters"]["learningRate"]
    assert reference_lr != 4e-4
    planted_diff = max_difference(adapter(out), adapter(planted))
    print(f"{what} vs 1 process at twice the learning rate: max |diff| = {planted_diff:.3g}")
    assert planted_diff > 10 * TOLERANCE


def group_pids(proc: Sidecar) -> tuple[int, list[int]]:
    """Launcher and worker pids of the group the latest job ran on (from the sidecar's log)."""
    found = re.findall(r"launcher pid (\d+), worker pids (\{.*?\})", proc.stderr())
    assert found, proc.stderr()[-3000:]
    launcher, workers = found[-1]
    return int(launcher), [int(p) for p in json.loads(workers).values()]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended (its parent may simply not have reaped it yet)


def wait_step(proc: Sidecar, job_id: str, step: int, timeout: float = 120) -> None:
    proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == job_id
                  and m["params"]["phase"] == "training" and m["params"]["step"] >= step, timeout)


@pytest.fixture(scope="module")
def sidecar():
    # One compute thread for the sidecar's own (reference) job: the workers get one each too, and
    # more threads than free cores make a shared 2-core machine crawl.
    proc = Sidecar(env={"LORA_SIDECAR_THREADS": "1"})
    yield proc
    assert proc.close() == 0
    started = re.findall(r"launcher pid (\d+), worker pids (\{.*?\})", proc.stderr())
    pids = [int(p) for launcher, workers in started for p in [launcher, *json.loads(workers).values()]]
    assert not [p for p in pids if running(p)], "processes left after shutdown"


@pytest.fixture(scope="module")
def single_process_adapter(sidecar, tiny_model_dir, tmp_path_factory) -> Path:
    """The reference: one process, batchSize 4 = 2 per process × 2 processes."""
    out = tmp_path_factory.mktemp("single") / "adapter"
    response = sidecar.call("train", {"baseModel": str(tiny_model_dir), "outputPath": str(out), **JOB,
                                      "batchSize": 4, "jobId": "single"}, timeout=300)
    assert "result" in response, response
    return out


class TestWorld:
    def test_each_rank_takes_its_rows_and_every_rank_syncs_once_per_step(self):
        class Rank(World):
            def __init__(self, rank: int) -> None:
                self.size, self.rank = 2, rank

        lengths = [10] * 9
        group = [[0, 1, 2, 3], [4, 5, 6, 7]]
        parts = {r: Rank(r).micro_batches(group, lengths, budget=0) for r in (0, 1)}
        assert parts[0] == [Part([0, 2], 2, False), Part([4, 6], 2, True)]
        assert parts[1] == [Part([1, 3], 2, False), Part([5, 7], 2, True)]
        # the budget splits a rank's rows; the last part still carries the synchronisation
        assert Rank(0).micro_batches(group, lengths, budget=10) == [
            Part([0], 2, False), Part([2], 2, False), Part([4], 2, False), Part([6], 2, True)]
        # a step with one row: rank 1 runs that row at weight 0, so it still joins the reduction
        assert Rank(0).micro_batches([[8]], lengths, 0) == [Part([8], 2, True)]
        assert Rank(1).micro_batches([[8]], lengths, 0) == [Part([8], 0.0, True)]
        # one process: the rows as given, weight 1
        assert World().micro_batches(group, lengths, 0) == [Part([0, 1, 2, 3], 1, False), Part([4, 5, 6, 7], 1, True)]


class TestDistributedJobs:
    def test_two_processes_give_the_single_process_adapter_then_reuse_the_warm_group(
            self, sidecar, tiny_model_dir, tmp_path, single_process_adapter):
        out = tmp_path / "dist"
        request = sidecar.request("train", distributed_params(tiny_model_dir, out, jobId="dist-1"))
        first = sidecar.response(request, timeout=300)
        assert "result" in first, first
        assert max_difference(adapter(out), adapter(single_process_adapter)) <= TOLERANCE
        # Effect floor: B starts at 0, so a job whose B stayed under 10x the tolerance would match
        # anything; this does not cover a uniform gradient scale (see TestGradientNormalisation).
        assert max(t.abs().max().item() for k, t in adapter(out).items() if "lora_B" in k) > 10 * TOLERANCE
        metrics = first["result"]["metrics"]
        reference = json.loads((single_process_adapter / "training_manifest.json").read_text())
        assert metrics["steps"] == 4 and metrics["examplesProcessed"] == reference["metrics"]["examplesProcessed"]
        assert metrics["trainLoss"] == pytest.approx(reference["metrics"]["trainLoss"], abs=1e-5)

        progress = sidecar.progress("dist-1")
        phases = [p["phase"] for p in progress]
        assert phases[0] == "queued" and phases[-1] == "completed"
        order = [PHASES.index(p) for p in phases]
        assert order == sorted(order) and "training" in phases, phases
        assert [p["step"] for p in progress if p["phase"] == "training"][-1] == 4
        done = sidecar.index_of(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == "dist-1"
                                and m["params"]["phase"] == "completed")
        assert 0 <= done < sidecar.index_of(lambda m: m.get("id") == request and "method" not in m)
        manifest = json.loads((out / "training_manifest.json").read_text())
        assert manifest["engine"]["distributed"] == {"processes": 2, "strategy": "ddp", "backend": "gloo",
                                                     "device": "cpu"}
        assert manifest["hyperparameters"]["distributed"]["processes"] == 2
        assert sidecar.bad_output == []
        launcher, workers = group_pids(sidecar)

        # The same job again: the group and its loaded model are reused, and the result is the same.
        again = sidecar.call("train", distributed_params(tiny_model_dir, tmp_path / "again", jobId="dist-2"),
                             timeout=300)["result"]
        assert group_pids(sidecar) == (launcher, workers)
        assert sidecar.stderr().count("worker group ready") == 1
        assert again["metrics"]["modelCached"] is True and metrics["modelCached"] is False
        assert again["metrics"]["timeToFirstStepMs"] < metrics["timeToFirstStepMs"]
        # The warm group starts each job from fresh LoRA weights: the second job equals the reference too.
        assert max_difference(adapter(tmp_path / "again"), adapter(single_process_adapter)) <= TOLERANCE

    def test_cancel_stops_the_whole_group_and_leaves_no_process(self, sidecar, tiny_model_dir, tmp_path):
        out = tmp_path / "cancelled"
        request = sidecar.request("train", distributed_params(tiny_model_dir, out, jobId="dist-cancel",
                                                               maxSteps=100_000))
        wait_step(sidecar, "dist-cancel", 2)
        launcher, workers = group_pids(sidecar)
        assert all(running(p) for p in [launcher, *workers])
        cancel = sidecar.request("cancel", {"jobId": "dist-cancel"})
        assert sidecar.response(cancel)["result"]["state"] == "cancelling"
        response = sidecar.response(request, timeout=60)
        assert response["error"]["code"] == -32800 and response["error"]["data"]["stepsCompleted"] >= 2
        # Promptness by counting steps, not seconds (the machine's load changes the seconds): the group
        # is stopped within a few steps of the sidecar acknowledging the cancel, in the order of its
        # own output. The bound covers the progress already queued in the sockets when the supervisor
        # looks (it checks between reads, at least every 0.1 s); a cancel that does not stop the group
        # runs on towards 100 000 steps.
        acked = sidecar.index_of(lambda m: m.get("id") == cancel and "method" not in m)
        answered = sidecar.index_of(lambda m: m.get("id") == request and "method" not in m)
        assert 0 <= acked < answered
        steps = [m["params"]["step"] for m in sidecar.all
                 if isinstance(m, dict) and m.get("method") == "progress" and m["params"]["jobId"] == "dist-cancel"
                 and m["params"]["phase"] == "training"]
        after_ack = [m["params"]["step"] for m in sidecar.all[acked + 1:answered]
                     if isinstance(m, dict) and m.get("method") == "progress"
                     and m["params"]["jobId"] == "dist-cancel" and m["params"]["phase"] == "training"]
        assert len(set(after_ack)) <= 20, f"{len(set(after_ack))} steps ran after the cancel was acknowledged"
        assert response["error"]["data"]["stepsCompleted"] == max(steps)  # nothing ran that was not reported
        assert not [p for p in [launcher, *workers] if running(p)]
        assert not out.exists() and not list(tmp_path.iterdir())
        assert sidecar.call("status")["result"]["recent"][0]["state"] == "cancelled"

    def test_a_killed_worker_fails_the_job_naming_its_rank_and_the_sidecar_keeps_serving(
            self, sidecar, tiny_model_dir, tmp_path):
        request = sidecar.request("train", distributed_params(tiny_model_dir, tmp_path / "a", jobId="dist-kill",
                                                               maxSteps=100_000))
        wait_step(sidecar, "dist-kill", 2)
        launcher, workers = group_pids(sidecar)
        os.kill(workers[1], signal.SIGKILL)
        error = sidecar.response(request, timeout=60)["error"]
        assert error["code"] == -32045, error
        data = error["data"]
        assert data["rank"] == 1 and data["pid"] == workers[1] and data["exitStatus"] == "signal 9 (SIGKILL)"
        assert "rank 1" in error["message"] and data["stderrTail"]
        assert any("rank1" in line for line in data["stderrTail"])  # rank 1's own log lines
        assert data["stderrTail"][-1] in error["message"]
        assert not [p for p in [launcher, *workers] if running(p)]
        status = sidecar.call("status")["result"]
        assert status["running"] is None and status["recent"][0]["state"] == "failed"
        assert "result" in sidecar.call("supports")

    def test_bad_distributed_params_are_refused_with_the_field(self, sidecar, tiny_model_dir, tmp_path):
        for spec, field in (({"processes": 0}, "$.distributed.processes"),
                            ({"processes": 2, "strategy": "zero"}, "$.distributed.strategy"),
                            ({"strategy": "ddp"}, "$.distributed")):
            error = sidecar.call("train", distributed_params(tiny_model_dir, tmp_path / "x", distributed=spec))["error"]
            assert error["code"] == -32602 and error["data"]["field"] == field, error
        error = sidecar.call("train", distributed_params(tiny_model_dir, tmp_path / "x", device="cpu",
                                                         distributed={"processes": 2, "backend": "nccl"}))["error"]
        assert error["code"] == -32602 and error["data"]["field"] == "$.distributed.backend", error
        error = sidecar.call("train", distributed_params(tiny_model_dir, tmp_path / "x", quantize=True,
                                                         distributed={"processes": 2, "strategy": "fsdp"}))["error"]
        assert error["code"] == -32016 and error["data"]["field"] == "$.distributed.strategy", error
        assert not list(tmp_path.iterdir())

    @pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="nccl starts where CUDA is present")
    def test_a_group_that_cannot_start_fails_the_job_with_the_rank_error(self, sidecar, tiny_model_dir, tmp_path):
        # nccl needs CUDA: this machine has none, so init_process_group fails in every rank.
        error = sidecar.call("train", distributed_params(tiny_model_dir, tmp_path / "x", distributed={
            "processes": 2, "backend": "nccl"}), timeout=120)["error"]
        assert error["code"] == -32046, error
        assert "NCCL" in error["message"] and "failed to start" in error["message"]
        assert error["data"]["stderrTail"] and not list(tmp_path.iterdir())
        assert sidecar.call("status")["result"]["running"] is None


def test_shutdown_stops_the_idle_warm_group(tiny_model_dir, tmp_path):
    with Sidecar(env={"LORA_SIDECAR_THREADS": "1"}) as proc:
        response = proc.call("train", distributed_params(tiny_model_dir, tmp_path / "a", maxSteps=1), timeout=300)
        assert "result" in response, response
        launcher, workers = group_pids(proc)
        assert all(running(p) for p in [launcher, *workers])  # idle, waiting for the next job
        assert proc.close() == 0
        assert not [p for p in [launcher, *workers] if running(p)]
        log = proc.stderr()
        assert "worker group stopped" in log
        # Not by the clock (load changes it): the ranks left the process group on the `exit` message,
        # rather than being SIGKILLed when the supervisor's wait for them ran out.
        for rank in (0, 1):
            assert f"rank {rank}: leaving the process group" in log, log[-3000:]


def test_fsdp_under_plain_torchrun_gives_the_single_process_adapter(tiny_model_dir, tmp_path,
                                                                     single_process_adapter):
    """The worker's one-shot mode (the multi-node entry point) with FSDP2 sharding over 2 processes,
    with AdamW (sharded optimizer state); gradient averaging is checked with SGD below."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"baseModel": str(tiny_model_dir), "outputPath": str(tmp_path / "fsdp"), **JOB,
                               "batchSize": 2, "jobId": "fsdp"}))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
         "sidecar.training.worker", "--strategy", "fsdp", "--job", str(job), "--result", str(tmp_path / "r.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["metrics"]["steps"] == 4
    assert max_difference(adapter(tmp_path / "fsdp"), adapter(single_process_adapter)) <= TOLERANCE
    manifest = json.loads((tmp_path / "fsdp" / "training_manifest.json").read_text())
    assert manifest["engine"]["distributed"]["strategy"] == "fsdp" and manifest["engine"]["selectiveLogits"] is False


# --- gradient normalisation: SGD sees what AdamW cannot --------------------------------------------

SGD_SHIM = """
import logging, os, sys
import torch

class SGD(torch.optim.SGD):
    \"\"\"Stands in for the recipe's AdamW: plain SGD, no momentum, so the update is lr x gradient.\"\"\"

    def __init__(self, params, lr, weight_decay=0.0, fused=None, **_):
        super().__init__(params, lr=lr, weight_decay=weight_decay)

torch.optim.AdamW = SGD
from sidecar.training.worker import main
code = main()
logging.shutdown()
sys.stderr.flush()
os._exit(code)
"""

# No clipping (it would normalise the gradient again), no weight decay (so twice the gradient is
# exactly twice the learning rate), a learning rate at which the update is far above the tolerance.
SGD_JOB = {**JOB, "maxGradNorm": 0.0, "weightDecay": 0.0, "learningRate": 0.1}


def single_process_sgd(model: Path, out: Path, learning_rate: float, monkeypatch) -> dict:
    """The single-process job (in this process, the recipe itself) with AdamW swapped for SGD."""
    import msgspec
    import torch

    from sidecar import wire
    from sidecar.models import ModelCache
    from sidecar.training import recipe

    class SGD(torch.optim.SGD):
        def __init__(self, params, lr, weight_decay=0.0, fused=None, **_):
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "AdamW", SGD)
    params = msgspec.convert({"baseModel": str(model), "outputPath": str(out), **SGD_JOB, "batchSize": 4,
                              "learningRate": learning_rate}, wire.TrainParams)
    cache = ModelCache()
    try:
        recipe.train(params, job_id=out.name, models=cache, report=lambda p: None, received_at=time.time(),
                     should_stop=lambda: False)
    finally:
        cache.evict_all()
    return adapter(out)


class TestGradientNormalisation:
    @pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
    def test_two_ranks_average_their_gradients_the_sgd_adapter_matches_the_single_process_one(
            self, strategy, tiny_model_dir, tmp_path, monkeypatch):
        """torchrun, 2 processes, the worker's one-shot mode; each process swaps AdamW for SGD first.

        With SGD, summing the two ranks' gradients instead of averaging them is the single-process job
        at twice the learning rate: the check is that the two-process adapter equals the one at the
        same rate within TOLERANCE, and the effect floor is that the one at twice the rate is at least
        10x TOLERANCE away from it."""
        monkeypatch.setenv("LORA_SIDECAR_DATA", str(tmp_path / "data"))
        monkeypatch.setenv("LORA_SIDECAR_THREADS", "1")
        same = single_process_sgd(tiny_model_dir, tmp_path / "single-lr", SGD_JOB["learningRate"], monkeypatch)
        double = single_process_sgd(tiny_model_dir, tmp_path / "single-2lr", 2 * SGD_JOB["learningRate"],
                                    monkeypatch)
        effect = max_difference(same, double)
        assert effect >= 10 * TOLERANCE, f"summing instead of averaging would move the adapter only {effect}"

        shim = tmp_path / "sgd_worker.py"
        shim.write_text(SGD_SHIM)
        job = tmp_path / "job.json"
        job.write_text(json.dumps({"baseModel": str(tiny_model_dir), "outputPath": str(tmp_path / "dist"), **SGD_JOB,
                                   "batchSize": 2, "jobId": f"sgd-{strategy}"}))
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(shim),
             "--strategy", strategy, "--job", str(job), "--result", str(tmp_path / "r.json")],
            cwd=REPO, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads((tmp_path / "r.json").read_text())["metrics"]["steps"] == 4
        dist = adapter(tmp_path / "dist")
        diff, to_double = max_difference(dist, same), max_difference(dist, double)
        print(f"{strategy}: |dist - single(lr)| = {diff:.3g}, |dist - single(2 lr)| = {to_double:.3g}, "
              f"effect of a 2x gradient = {effect:.3g}")
        assert diff <= TOLERANCE, (f"the 2-process SGD adapter is {diff:.3g} from the single-process one "
                                   f"(and {to_double:.3g} from the single-process one at twice the learning rate)")
