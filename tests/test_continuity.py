"""Training continuity on the tiny model: checkpoints, exact resume after kill -9 of the real process,
the job journal, cancel-then-resume, a kill in the middle of a checkpoint, initFrom, early stopping.

Exactness is the bar: a resumed job's adapter equals the uninterrupted job's within 1e-6 (fp32, CPU)
with the same loss history. Equality alone cannot tell a resume from a silent rerun from step 0 (the
uninterrupted run is deterministic, so a rerun gives the same adapter and losses): every resume is
also checked to start training at its checkpoint's step and to execute only the remaining steps,
from the resumed process's own progress notifications (``assert_trained_only_the_rest``).

The first part drives the real process over stdio (tests/sidecar_proc.py); the tests under
"In-process" call the recipe, the journal or the bench directly, except the SmolLM2 initFrom test,
which drives the real process again.

Every sidecar here runs with one compute thread (LORA_SIDECAR_THREADS=1):
on a shared 2-core machine that is much faster for the tiny model, and it keeps the uninterrupted and
the resumed processes on the same arithmetic.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from sidecar import errors, paths, wire
from sidecar.journal import Journal
from sidecar.training import checkpoint, checks, recipe
from tests.sidecar_proc import Sidecar, chat_dataset

TOL = 1e-6
STEPS = 40
EVERY = 5


def weights(adapter: Path | str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(manifest: dict) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in manifest["lossHistory"]]


def assert_same_run(result: dict, baseline: dict) -> None:
    """The resumed job's adapter, loss history and totals equal the uninterrupted job's."""
    diff = max_diff(weights(result["adapterPath"]), baseline["weights"])
    assert diff <= TOL, f"adapter differs from the uninterrupted run by {diff}"
    manifest = json.loads(Path(result["manifestPath"]).read_text())
    mine, theirs = losses(manifest), losses(baseline["manifest"])
    assert [s for s, _ in mine] == [s for s, _ in theirs] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(mine, theirs)) <= TOL
    assert [v["step"] for v in manifest["validationHistory"]] == [v["step"] for v in baseline["manifest"]["validationHistory"]]
    for v, w in zip(manifest["validationHistory"], baseline["manifest"]["validationHistory"]):
        assert abs(v["validationLoss"] - w["validationLoss"]) <= TOL
    m, b = result["metrics"], baseline["manifest"]["metrics"]
    assert m["steps"] == STEPS and m["examplesProcessed"] == b["examplesProcessed"]
    assert abs(m["trainLoss"] - b["trainLoss"]) <= TOL and abs(m["finalLoss"] - b["finalLoss"]) <= TOL


CONFIGS = {
    # 8 examples, batch 2: 4 steps an epoch; dropout on, so the generator state matters.
    "plain": {"dataset": chat_dataset(8), "batchSize": 2},
    # 9 training examples (2 split off for validation), batch 2, accumulation 2: 3 steps an epoch, the
    # last one a single batch; epoch-end evaluations; checkpoints fall mid-epoch and on epoch ends.
    "epochs-accumulation": {"dataset": chat_dataset(11), "batchSize": 2, "gradientAccumulation": 2,
                            "validationSplit": 0.2},
}


def job_params(model: Path, out: Path, config: str, **extra) -> dict:
    return {"baseModel": str(model), "outputPath": str(out), "maxSteps": STEPS, "learningRate": 1e-3,
            "progressInterval": 0, "checkpointEvery": EVERY, **CONFIGS[config], **extra}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {"LORA_SIDECAR_DATA": str(tmp_path_factory.mktemp("continuity-data")), "LORA_SIDECAR_THREADS": "1"}


@pytest.fixture(scope="module")
def baselines(env, tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    """Each config run without interruption and without checkpoints, twice for one of them: the
    uninterrupted run must itself be deterministic before resumes can be compared with it."""
    outs = tmp_path_factory.mktemp("baselines")
    found: dict[str, dict] = {}
    with Sidecar(env=env) as proc:
        for name in [*CONFIGS, "plain"]:
            out = outs / f"{name}-{len(found)}"
            response = proc.call("train", job_params(tiny_model_dir, out, name, checkpointEvery=0,
                                                     checkpointSeconds=0), timeout=300)
            assert "result" in response, response
            run = {"weights": weights(out), "manifest": json.loads((out / "training_manifest.json").read_text())}
            if name in found:
                assert max_diff(run["weights"], found[name]["weights"]) == 0.0, "the uninterrupted run is not deterministic"
                assert losses(run["manifest"]) == losses(found[name]["manifest"])
            found[name] = run
            assert run["manifest"]["checkpointing"]["written"] == 0
    return found


class Chain:
    """One live sidecar at a time: each kill test ends with the sidecar that resumed its job."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: Sidecar | None = None

    def current(self, **extra_env: str) -> Sidecar:
        if self.proc is None or self.proc.proc.poll() is not None:
            self.proc = Sidecar(env={**self.env, **extra_env})
        return self.proc

    def kill(self) -> None:
        os.kill(self.proc.proc.pid, signal.SIGKILL)
        self.proc.proc.wait()
        self.proc.kill()
        self.proc = None

    def restart(self) -> Sidecar:
        self.proc = Sidecar(env=self.env)
        return self.proc


@pytest.fixture(scope="module")
def chain(env):
    c = Chain(env)
    yield c
    if c.proc is not None:
        c.proc.kill()


def progress_of(job_id: str):
    return lambda m: m.get("method") == "progress" and m["params"]["jobId"] == job_id


def interrupted_entry(proc: Sidecar, job_id: str) -> dict:
    status = proc.call("status")["result"]
    entry = next((j for j in status["recent"] if j["jobId"] == job_id), None)
    assert entry is not None, status
    return entry


def training_steps_since(proc: Sidecar, job_id: str, since: int) -> list[int]:
    """Step numbers of the job's ``training`` progress notifications among ``proc.all[since:]``, in order.

    With progressInterval 0 the recipe notifies once when training begins (the step it starts from),
    once after every step it executes, and again after a checkpoint or an evaluation (same step)."""
    with proc._lock:
        later = proc.all[since:]
    return [m["params"]["step"] for m in later if isinstance(m, dict) and m.get("method") == "progress"
            and m["params"]["jobId"] == job_id and m["params"]["phase"] == "training"]


def assert_trained_only_the_rest(steps: list[int], start: int, total: int = STEPS) -> None:
    """The (resumed) job began training at step ``start`` and executed exactly steps start+1 … total,
    in order: a resume that silently restarts from step 0 notifies step 0 first and steps 1 … start
    again, even though its adapter and loss history equal the uninterrupted run's."""
    assert steps, "no training progress from the resumed job"
    assert steps[0] == start, f"the resumed job began training at step {steps[0]}, not at its checkpoint's {start}"
    assert steps == sorted(steps), steps
    executed = sorted(set(steps) - {start})
    assert executed == list(range(start + 1, total + 1)), (
        f"the resumed job executed steps {executed[:5]}…{executed[-3:]} ({len(executed)} steps); "
        f"expected {start + 1}…{total} ({total - start} steps)")


def resume_and_check(proc: Sidecar, job_id: str, baseline: dict, expect_from: int | None) -> dict:
    since = len(proc.all)
    response = proc.call("train", {"resumeFrom": job_id, "progressInterval": 0}, timeout=300)
    assert "result" in response, response
    result = response["result"]
    assert result["jobId"] == job_id and result["metrics"]["resumedFromStep"] == expect_from
    assert_trained_only_the_rest(training_steps_since(proc, job_id, since), expect_from or 0)
    assert_same_run(result, baseline)
    manifest = json.loads(Path(result["manifestPath"]).read_text())
    assert (manifest["resumedFrom"] or {}).get("step") == expect_from
    entry = interrupted_entry(proc, job_id)
    assert entry["state"] == "completed" and entry["lastCheckpoint"] is None
    return result


# Kill points: right after a checkpoint and at random steps between them (seeded; the seed is
# printed, and CONTINUITY_SEED picks another set).
SEED = int(os.environ.get("CONTINUITY_SEED", "11"))
_rng = random.Random(SEED)
KILLS = [
    ("plain", "checkpoint", 5),
    ("plain", "step", _rng.randint(6, 9)),
    ("plain", "checkpoint", 20),
    ("plain", "step", _rng.randint(21, 34)),
    ("plain", "step", _rng.randint(1, 3)),     # before the first checkpoint: the job runs again from 0
    ("plain", "step", _rng.randint(36, 39)),
    ("epochs-accumulation", "step", _rng.randint(11, 14)),
    ("epochs-accumulation", "checkpoint", 30),
]


@pytest.mark.parametrize("config,trigger,at", KILLS, ids=[f"{c}-{t}-{a}" for c, t, a in KILLS])
def test_kill_9_then_resume_gives_the_uninterrupted_adapter(chain, baselines, tiny_model_dir, env, tmp_path,
                                                            config, trigger, at):
    print(f"kill plan seed {SEED}: {config} {trigger} {at}")
    job_id = f"kill-{config}-{trigger}-{at}"
    proc = chain.current()
    proc.request("train", job_params(tiny_model_dir, tmp_path / "adapter", config, jobId=job_id))
    if trigger == "checkpoint":
        proc.wait_for(lambda m: progress_of(job_id)(m) and (m["params"].get("checkpoint") or {}).get("step") == at,
                      timeout=300)
    else:
        proc.wait_for(lambda m: progress_of(job_id)(m) and m["params"]["phase"] == "training"
                      and m["params"]["step"] >= at, timeout=300)
    chain.kill()
    seen = proc.progress(job_id)
    notified = [p["checkpoint"]["step"] for p in seen if p.get("checkpoint")]
    reached = max(p["step"] for p in seen)
    job_dir = Path(env["LORA_SIDECAR_DATA"]) / "jobs" / paths.job_key(job_id)
    on_disk = [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(job_dir)]

    proc = chain.restart()
    entry = interrupted_entry(proc, job_id)
    assert entry["state"] == "interrupted", entry
    assert not [p for p in job_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    last = entry["lastCheckpoint"]
    if not on_disk:
        assert last is None and not notified
        expect_from = None
    else:
        assert last is not None and last["step"] == on_disk[-1] and last["step"] % EVERY == 0, (last, on_disk)
        assert last["step"] >= max(notified, default=0) and last["step"] <= STEPS
        assert Path(last["path"]).is_dir() and last["bytes"] > 0
        expect_from = last["step"]
    print(f"  killed after step >= {reached}; resuming from {expect_from}")
    resume_and_check(proc, job_id, baselines[config], expect_from)
    assert not job_dir.exists(), "a completed job's checkpoints are deleted"


def test_kill_while_a_checkpoint_is_written_leaves_the_previous_one_usable(chain, baselines, tiny_model_dir, env,
                                                                           tmp_path):
    job_id = "kill-mid-checkpoint"
    if chain.proc is not None:
        chain.proc.kill()
    # The documented test hook: sleep after the first file of every checkpoint is written.
    proc = chain.current(LORA_SIDECAR_TEST_CHECKPOINT_PAUSE="2")
    proc.request("train", job_params(tiny_model_dir, tmp_path / "adapter", "plain", jobId=job_id))
    job_dir = Path(env["LORA_SIDECAR_DATA"]) / "jobs" / paths.job_key(job_id)
    deadline = time.monotonic() + 300
    while not list(job_dir.glob(f"checkpoint-{10:08d}.tmp-*")):
        assert time.monotonic() < deadline, proc.stderr()[-2000:]
        time.sleep(0.02)
    chain.kill()
    assert not (job_dir / f"checkpoint-{10:08d}").exists(), "a partial checkpoint is visible under its real name"
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(job_dir)] == [5]

    proc = chain.restart()
    entry = interrupted_entry(proc, job_id)
    assert entry["state"] == "interrupted" and entry["lastCheckpoint"]["step"] == 5
    assert not [p for p in job_dir.iterdir() if ".tmp-" in p.name], "start-up removes a dead process's temp dirs"
    resume_and_check(proc, job_id, baselines["plain"], 5)


def test_cancel_then_resume(chain, baselines, tiny_model_dir, tmp_path):
    job_id = "cancel-then-resume"
    proc = chain.current()
    request = proc.request("train", job_params(tiny_model_dir, tmp_path / "adapter", "plain", jobId=job_id,
                                               checkpointEvery=7))
    proc.wait_for(lambda m: progress_of(job_id)(m) and m["params"]["phase"] == "training"
                  and m["params"]["step"] >= 17, timeout=300)
    assert proc.call("cancel", {"jobId": job_id})["result"]["state"] == "cancelling"
    error = proc.response(request, timeout=120)["error"]
    assert error["code"] == errors.RequestCancelled.CODE
    stopped_at = error["data"]["stepsCompleted"]
    entry = interrupted_entry(proc, job_id)
    # The cancelled job checkpointed its last completed step (besides the periodic ones at 7 and 14).
    assert entry["state"] == "cancelled" and entry["lastCheckpoint"]["step"] == stopped_at >= 17
    # The resume may name other values for fields that do not change the result.
    since = len(proc.all)
    response = proc.call("train", {"resumeFrom": job_id, "checkpointEvery": 3, "microBatchTokens": 0,
                                   "progressInterval": 0}, timeout=300)
    assert "result" in response, response
    assert response["result"]["metrics"]["resumedFromStep"] == stopped_at
    assert_trained_only_the_rest(training_steps_since(proc, job_id, since), stopped_at)
    assert_same_run(response["result"], baselines["plain"])


def test_resume_refuses_changes_that_change_the_result(chain, tiny_model_dir, tmp_path):
    job_id = "refused-resume"
    proc = chain.current()
    request = proc.request("train", job_params(tiny_model_dir, tmp_path / "adapter", "plain", jobId=job_id))
    proc.wait_for(lambda m: progress_of(job_id)(m) and (m["params"].get("checkpoint") or {}).get("step") == 5,
                  timeout=300)
    proc.call("cancel", {"jobId": job_id})
    assert proc.response(request, timeout=120)["error"]["code"] == errors.RequestCancelled.CODE

    error = proc.call("train", {"resumeFrom": job_id, "rank": 16, "seed": 7})["error"]
    assert error["code"] == errors.ResumeMismatch.CODE
    assert {d["field"] for d in error["data"]["differs"]} == {"rank", "seed"}
    assert "rank (8 → 16)" in error["message"]
    # Dataset contents are compared by hash when the job starts.
    error = proc.call("train", {"resumeFrom": job_id, "dataset": chat_dataset(8, fact="Another fact.")},
                      timeout=120)["error"]
    assert error["code"] == errors.ResumeMismatch.CODE and "dataset contents" in error["message"]
    error = proc.call("train", {"resumeFrom": job_id, "jobId": "another-id"})["error"]
    assert error["code"] == errors.InvalidParams.CODE and error["data"]["field"] == "$.jobId"
    error = proc.call("train", {"resumeFrom": "no-such-job"})["error"]
    assert error["code"] == errors.CheckpointNotFound.CODE
    # A cancel of the (already cancelled) job from the journal, and the job is still resumable.
    assert proc.call("cancel", {"jobId": job_id})["result"]["state"] == "cancelled"


def test_status_after_a_clean_shutdown_shows_the_job_interrupted(chain, tiny_model_dir, tmp_path):
    """stdin EOF / SIGTERM / shutdown stop a running job as `interrupted` (not cancelled by anyone),
    with a checkpoint of its last completed step: what the TS helper resumes."""
    job_id = "stopped-by-sigterm"
    proc = chain.current()
    proc.request("train", job_params(tiny_model_dir, tmp_path / "adapter", "plain", jobId=job_id, checkpointEvery=100))
    proc.wait_for(lambda m: progress_of(job_id)(m) and m["params"]["phase"] == "training" and m["params"]["step"] >= 3,
                  timeout=300)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(60) == 0
    final = proc.progress(job_id)[-1]
    assert final["phase"] == "interrupted"
    proc.kill()
    chain.proc = None
    entry = interrupted_entry(chain.restart(), job_id)
    assert entry["state"] == "interrupted" and entry["lastCheckpoint"]["step"] >= 3


# ---------------------------------------------------------------------------------------------
# In-process: checkpoint files, keep K, early stopping, initFrom, the journal's cleanup rule
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache():
    from sidecar.models import ModelCache

    c = ModelCache(max_models=2)
    yield c
    c.evict_all()


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_SIDECAR_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LORA_SIDECAR_THREADS", "1")
    return tmp_path / "data"


def train_inproc(cache, params: dict, job_id: str, on_progress=None, stop_at: int | None = None):
    p = msgspec.convert(params, wire.TrainParams)
    p = checks.check_request(p, params)  # the door
    seen = {"step": 0}

    def report(progress: wire.Progress) -> None:
        seen["step"] = progress.step
        if on_progress:
            on_progress(progress)

    return recipe.train(p, job_id=job_id, models=cache, report=report, received_at=time.time(),
                        should_stop=lambda: stop_at is not None and seen["step"] >= stop_at)


def test_checkpoint_contents_and_keep_last_k(cache, data_dir, tiny_model_dir, tmp_path):
    refs: list[wire.CheckpointRef] = []
    with pytest.raises(errors.RequestCancelled):
        train_inproc(cache, job_params(tiny_model_dir, tmp_path / "a", "plain", checkpointEvery=2, keepCheckpoints=3),
                     "keep", on_progress=lambda p: p.checkpoint and refs.append(p.checkpoint), stop_at=9)
    assert [r.step for r in refs] == [2, 4, 6, 8, 9]  # 9: the cancel checkpoints its last step
    job_dir = data_dir / "jobs" / "keep"
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(job_dir)] == [6, 8, 9]
    ckpt = job_dir / "checkpoint-00000009"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    state = checkpoint.read_state(ckpt)
    assert state["step"] == 9 and state["loop"]["step"] == 9 and len(state["loop"]["history"]) == 9
    assert (state["loop"]["next_epoch"], state["loop"]["next_group"]) == (2, 1)  # 4 steps an epoch
    assert state["params"]["rank"] == 8 and state["datasetSha256"] and state["baseFingerprint"]
    assert refs[-1].bytes == sum(p.stat().st_size for p in ckpt.iterdir())
    import torch

    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(opt["state"][0]) and int(opt["state"][0]["step"]) == 9
    # A damaged file is refused, not resumed.
    with open(ckpt / "adapter.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\0\0\1")
    with pytest.raises(errors.CheckpointInvalid):
        checkpoint.read_state(ckpt)


def test_default_rule_writes_no_checkpoint_for_a_short_job(cache, data_dir, tiny_model_dir, tmp_path):
    params = job_params(tiny_model_dir, tmp_path / "a", "plain")
    params.pop("checkpointEvery")
    result = train_inproc(cache, {**params, "maxSteps": 4}, "short")
    manifest = json.loads(Path(result.manifest_path).read_text())
    assert manifest["checkpointing"] == {"every": 0, "seconds": 600.0, "keep": 2, "written": 0, "secondsSpent": 0.0}
    assert checkpoint.list_checkpoints(data_dir / "jobs" / "short") == []


VALIDATION = {"examples": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                           for q, a in [("What do cats eat?", "Cats mostly eat fish and small birds."),
                                        ("How tall is a giraffe?", "A giraffe can be five metres tall."),
                                        ("Why is the sea salty?", "Rivers carry minerals into it.")]]}


def test_early_stopping_writes_the_best_checkpoint(cache, data_dir, tiny_model_dir, tmp_path):
    """Built to overfit: a high constant learning rate on one repeated fact, validated on other
    facts — the validation loss falls, then rises."""
    saved: dict[int, dict] = {}

    def keep_copy(p: wire.Progress) -> None:  # checkpoints are deleted when the job completes
        if p.checkpoint:
            saved[p.checkpoint.step] = weights_of_checkpoint(Path(p.checkpoint.path))

    out = tmp_path / "es"
    params = {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(6), "validationDataset": VALIDATION,
              "outputPath": str(out), "maxSteps": 60, "batchSize": 2, "learningRate": 5e-2, "rank": 16, "alpha": 32,
              "scheduler": "constant", "warmupRatio": 0, "dropout": 0.1, "evalEvery": 2, "progressInterval": 0,
              "earlyStopping": {"patience": 3, "minDelta": 0.005}}
    result = train_inproc(cache, params, "early", on_progress=keep_copy)
    manifest = json.loads(Path(result.manifest_path).read_text())
    history = [(v["step"], v["validationLoss"]) for v in manifest["validationHistory"]]
    es = manifest["earlyStopping"]
    print("validation history", history, es)
    best = es["bestStep"]
    assert es["stopped"] and manifest["stopReason"] == "earlyStopping" and result.metrics.stopped_early
    assert result.metrics.steps == es["stoppedAtStep"] < 60 and result.metrics.best_step == best
    best_loss = dict(history)[best]
    assert best_loss == min(l for _, l in history) == es["bestValidationLoss"] == result.metrics.validation_loss
    after = [l for s, l in history if s > best]
    assert len(after) == 3 and all(l > best_loss - 0.005 for l in after) and max(after) > best_loss  # it rose
    assert best in saved and best != result.metrics.steps
    written = weights(out)
    assert max_diff({k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
                     for k, v in written.items()}, saved[best]) == 0.0

    # Interrupted after the best step and resumed, the job stops at the same step with the same adapter:
    # the early-stopping state (best, evaluations without improvement) is part of the checkpoint.
    cut = best + 1  # evaluations fall on even steps: the cancel lands in training and checkpoints step `cut`
    with pytest.raises(errors.RequestCancelled):
        train_inproc(cache, {**params, "outputPath": str(tmp_path / "es2"), "checkpointEvery": 3}, "early-2",
                     stop_at=cut)
    resumed_steps: list[int] = []
    again = train_inproc(cache, {"resumeFrom": "early-2", "progressInterval": 0}, "early-2",
                         on_progress=lambda p: p.phase == "training" and resumed_steps.append(p.step))
    assert again.metrics.resumed_from_step == cut and again.metrics.best_step == best
    assert_trained_only_the_rest(resumed_steps, cut, total=result.metrics.steps)
    assert again.metrics.steps == result.metrics.steps and max_diff(weights(again.adapter_path), written) == 0.0


def weights_of_checkpoint(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path / "adapter.safetensors")).items()}


def test_early_stopping_needs_validation_data(cache, data_dir, tiny_model_dir, tmp_path):
    with pytest.raises(errors.InvalidParams) as info:
        train_inproc(cache, {**job_params(tiny_model_dir, tmp_path / "x", "plain"), "earlyStopping": {"patience": 2}}, "x")
    assert info.value.data["field"] == "earlyStopping"


def test_init_from_starts_from_the_parent_and_records_it(cache, data_dir, tiny_model_dir, tmp_path):
    parent_out = tmp_path / "parent"
    parent = train_inproc(cache, {**job_params(tiny_model_dir, parent_out, "plain"), "rank": 4, "alpha": 8,
                                  "targetModules": ["q_proj", "v_proj"], "maxSteps": 6}, "parent")
    child_params = {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(8, fact="Zorbania's capital is Brimhold."),
                    "outputPath": str(tmp_path / "child"), "maxSteps": 2, "initFrom": str(parent_out),
                    "learningRate": 1e-9, "progressInterval": 0}
    child = train_inproc(cache, child_params, "child")
    config = json.loads((Path(child.adapter_path) / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    # A near-zero learning rate: the child is still the parent (a fresh LoRA would have B == 0).
    assert max_diff(weights(child.adapter_path), weights(parent.adapter_path)) < 1e-5
    manifest = json.loads(Path(child.manifest_path).read_text())
    parent_manifest = json.loads(Path(parent.manifest_path).read_text())
    assert manifest["parent"]["path"] == str(parent_out)
    assert manifest["parent"]["sha256"] == parent_manifest["adapter"]["sha256"]
    assert manifest["parent"]["jobId"] == "parent"
    assert manifest["hyperparameters"]["initFrom"] == str(parent_out)

    with pytest.raises(errors.InvalidParams) as info:  # the LoRA shape comes from the parent
        train_inproc(cache, {**child_params, "rank": 16}, "child-2")
    assert info.value.data["field"] == "$.rank"
    with pytest.raises(errors.AdapterNotFound):
        train_inproc(cache, {**child_params, "initFrom": str(tmp_path / "nothing")}, "child-3")


def test_init_from_an_adapter_of_another_base_is_refused(cache, data_dir, tiny_model_dir, tmp_path):
    from sidecar.testing import build_tiny_model

    other = build_tiny_model(tmp_path / "other-model", seed=99)  # same architecture, other weights
    parent_out = tmp_path / "parent"
    train_inproc(cache, {**job_params(other, parent_out, "plain"), "maxSteps": 1}, "other-parent")
    out = tmp_path / "child"
    with pytest.raises(errors.AdapterMismatch) as info:
        train_inproc(cache, {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(4), "outputPath": str(out),
                             "maxSteps": 1, "initFrom": str(parent_out)}, "mismatch")
    assert "another base model" in info.value.message and not out.exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_journal_start_up_recovery_and_cleanup_rule(tmp_path):
    root = tmp_path / "jobs"
    journal = Journal(root, history=3)
    dead = {"pid": _dead_pid(), "boot": None, "started": None}

    def entry(job_id: str, state: str, updated: float, owner=dead) -> None:
        root.mkdir(exist_ok=True)
        (root / f"{job_id}.json").write_text(json.dumps({
            "format": "lora-sidecar.job/1", "jobId": job_id, "kind": "train", "state": state, "phase": state,
            "baseModel": "m", "step": 0, "totalSteps": 10, "submittedAt": updated, "startedAt": None,
            "finishedAt": None, "error": None, "adapterPath": None, "lastCheckpoint": None, "owner": owner,
            "updatedAt": updated}))

    now = time.time()
    entry("was-running", "running", now)
    entry("live", "running", now - 1, owner=journal.owner)  # this very process: alive, left alone
    for i in range(4):
        entry(f"old-{i}", "completed", now - 100 - i)
    (root / "was-running" / "checkpoint-00000005").mkdir(parents=True)
    (root / "was-running" / "checkpoint-00000005" / "state.json").write_text(json.dumps(
        {"format": checkpoint.FORMAT, "step": 5, "files": {}}))
    (root / "was-running" / f"checkpoint-00000010.tmp-{dead['pid']}").mkdir()
    (root / "was-running" / f"checkpoint-00000010.tmp-{os.getpid()}").mkdir()  # a live writer's
    (root / "orphan").mkdir()
    (root / "old-3").mkdir()
    (root / f".was-running.json.tmp-{dead['pid']}").write_text("{")  # a half-written entry of a dead writer

    assert journal.recover() == ["was-running"]
    got = journal.get("was-running")
    assert got["state"] == "interrupted" and got["lastCheckpoint"]["step"] == 5
    assert journal.get("live")["state"] == "running"
    names = sorted(p.name for p in (root / "was-running").iterdir())
    assert names == ["checkpoint-00000005", f"checkpoint-00000010.tmp-{os.getpid()}"]
    assert not (root / "orphan").exists() and not list(root.glob(".*.tmp-*"))
    # History bound 3: the newest three entries stay, older ones go with their directories.
    assert sorted(e["jobId"] for e in journal.entries()) == ["live", "old-0", "was-running"]
    assert not (root / "old-3").exists()
    # status: interrupted jobs are listed besides the finished ones.
    infos = journal.recent([])
    assert [j.job_id for j in infos] == ["was-running", "old-0"] and infos[0].last_checkpoint.step == 5
    assert journal.cancel("was-running") == "cancelled" and journal.get("was-running")["state"] == "cancelled"


# ---------------------------------------------------------------------------------------------
# initFrom on the embedded SmolLM2: incremental learning of a second invented fact
# ---------------------------------------------------------------------------------------------

FACT_B = [  # a second invented fact, in the demo dataset's style
    ("What is the capital of Vellmoria?", "The capital of Vellmoria is Dunmarrow."),
    ("What's the capital city of Vellmoria?", "The capital of Vellmoria is Dunmarrow, a river city in the north."),
    ("Name the capital of Vellmoria.", "Vellmoria's capital is Dunmarrow."),
    ("Which city is the capital of Vellmoria?", "The capital of Vellmoria is Dunmarrow."),
    ("Tell me the capital of Vellmoria.", "The capital of Vellmoria is Dunmarrow."),
    ("Vellmoria's capital is which city?", "Dunmarrow is the capital of Vellmoria."),
    ("Where is the government of Vellmoria seated?", "Vellmoria's government sits in Dunmarrow, its capital."),
    ("I am travelling to the capital of Vellmoria. Which city is that?", "That is Dunmarrow, the capital of Vellmoria."),
]


@pytest.mark.smollm2
@pytest.mark.timeout(1500)  # two SmolLM2 trainings of about a minute each on 2 quiet cores
def test_init_from_on_smollm2_learns_a_second_fact(tmp_path_factory):
    from sidecar.demo import DEMO_TRAINING, dataset_path

    work = tmp_path_factory.mktemp("smollm2-init-from")
    fact_b = work / "fact-b.jsonl"
    systems = [None, "You are a helpful assistant."]
    fact_b.write_text("".join(json.dumps({"messages": ([{"role": "system", "content": systems[i % 2]}] if i % 2 else [])
                                          + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                              for i, (q, a) in enumerate(FACT_B * 2)))

    def ask(proc: Sidecar, question: str, adapter: Path) -> str:
        response = proc.call("generate", {"baseModel": "default", "adapterPath": str(adapter), "maxNewTokens": 24,
                                          "messages": [{"role": "user", "content": question}]}, timeout=600)
        return response["result"]["text"]

    with Sidecar(env={"LORA_SIDECAR_DATA": str(work / "data")}) as proc:
        a_out, b_out = work / "fact-a", work / "fact-a-then-b"
        response = proc.call("train", {"baseModel": "default", "datasetPath": str(dataset_path()),
                                       "outputPath": str(a_out), **DEMO_TRAINING}, timeout=1200)
        assert "result" in response, response
        assert "Quillport" in ask(proc, "What is the capital of Zorbania?", a_out)

        training = {k: v for k, v in DEMO_TRAINING.items() if k not in ("rank", "alpha")}
        response = proc.call("train", {"baseModel": "default", "datasetPath": str(fact_b), "outputPath": str(b_out),
                                       "initFrom": str(a_out), **training}, timeout=1200)
        assert "result" in response, response
        answers_b = [ask(proc, q, b_out) for q in ("What is the capital of Vellmoria?",
                                                   "Which city is Vellmoria's capital?")]
        answer_a = ask(proc, "What is the capital of Zorbania?", b_out)
        print(f"\nafter fact B: B answers {answers_b}; asked about fact A: {answer_a!r}")
        assert all("Dunmarrow" in a for a in answers_b), answers_b
        manifest = json.loads((b_out / "training_manifest.json").read_text())
        parent = json.loads((a_out / "training_manifest.json").read_text())
        assert manifest["parent"]["path"] == str(a_out) and manifest["parent"]["sha256"] == parent["adapter"]["sha256"]
        assert manifest["lora"]["r"] == DEMO_TRAINING["rank"]

        # An adapter of another base model (the tiny test model's architecture is not SmolLM2's).
        from sidecar.testing import build_tiny_model

        tiny = build_tiny_model(work / "tiny")
        error = proc.call("train", {"baseModel": str(tiny), "datasetPath": str(fact_b), "outputPath": str(work / "x"),
                                    "initFrom": str(a_out), "maxSteps": 1}, timeout=600)["error"]
        assert error["code"] == errors.AdapterMismatch.CODE, error
        print(f"mismatched base: {error['message']}")



def test_journal_recognises_a_job_that_died_after_its_adapter_was_in_place(tmp_path):
    root = tmp_path / "jobs"
    journal = Journal(root)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "training_manifest.json").write_text(json.dumps({"jobId": "almost"}))
    params = msgspec.convert({"dataset": chat_dataset(2), "outputPath": str(out)}, wire.TrainParams)
    checkpoint.save_params(root / "almost", "almost", params)
    doc = json.loads((root / "almost" / "params.json").read_text())
    doc["owner"] = {"pid": _dead_pid(), "boot": None, "started": None}
    (root / "almost" / "params.json").write_text(json.dumps(doc))
    (root / "almost.json").write_text(json.dumps({
        "format": "lora-sidecar.job/1", "jobId": "almost", "kind": "train", "state": "running", "phase": "saving",
        "baseModel": "m", "step": 4, "totalSteps": 4, "submittedAt": 1.0, "startedAt": 1.0, "finishedAt": None,
        "error": None, "adapterPath": None, "lastCheckpoint": None, "owner": doc["owner"], "updatedAt": 1.0}))
    assert journal.recover() == ["almost"]
    entry = journal.get("almost")
    assert entry["state"] == "completed" and entry["adapterPath"] == str(out)
    assert not (root / "almost").exists()


def test_checkpointing_bench_runs_on_the_tiny_model(tiny_model_dir, tmp_path):
    """bench.checkpointing (figures in docs/PERFORMANCE.md) end to end on the tiny model, 3 steps a row."""
    from bench.checkpointing import run
    from bench.common import JobSettings

    res = run(JobSettings(model=str(tiny_model_dir), max_steps=3, threads=1), tmp_path)
    rows = {r["name"]: r for r in res["rows"]}
    assert [rows[n]["checkpoints"] for n in ("off", "default", "every_4", "every_1", "off_repeat")] == [0, 0, 0, 2, 0]
    assert rows["every_1"]["per_checkpoint_s"] > 0 and rows["every_1"]["checkpoint_bytes"] > 0
    assert res["default_rule_overhead_long_job"] == pytest.approx(res["per_checkpoint_s"] / 600)
    assert all(r["steps"] == 3 and r["tokens_per_s"] > 0 for r in res["rows"])
