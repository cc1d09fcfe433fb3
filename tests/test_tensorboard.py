"""TensorBoard event files beside every trained adapter (issue 22, training/tensorboard.py), through the
real process, read back with TensorBoard's own reader (``EventAccumulator``).

Checked on the tiny model: one ``train/loss`` event per optimizer step 1..N whose value is the job's
``lossHistory`` entry (training_metrics.json) rounded to float32 — TensorBoard's ``simple_value`` is a
float32, so that is exact equality, well inside 1e-6 for losses near 11 — with a planted error (the
history shifted by one step fails the same check); ``eval/loss`` at exactly the evaluations of the
training manifest's ``validationHistory``; learning rate, gradient norm, token accuracy, tokens/s and
memory at every step; ``tensorboard: false`` writes no ``runs/``; a cancelled then resumed job still has
one event per step 1..N (the steps before the cancel come from the checkpoint); and a sidecar without
tensorboardX completes the job with one warning and no events.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from tests.sidecar_proc import Sidecar, chat_dataset
from tests.test_package import package_problems

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

STEPS = 5
PER_STEP = ("train/loss", "train/learning_rate", "train/epoch", "train/grad_norm", "train/token_accuracy",
            "train/tokens_per_second", "train/rss_mb")


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def read_events(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar tag of the run → [(step, value, wall time)], as TensorBoard reads them."""
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def loss_problems(events: dict, loss_history: list[float]) -> list[str]:
    """What is wrong with the ``train/loss`` events against the job's loss history (empty: nothing)."""
    got = events.get("train/loss", [])
    problems = []
    if [s for s, _, _ in got] != list(range(1, len(loss_history) + 1)):
        problems.append(f"steps {[s for s, _, _ in got]}")
    problems += [f"step {s}: {v!r} != {f32(h)!r}" for (s, v, _), h in zip(got, loss_history) if v != f32(h)]
    return problems


def train(proc: Sidecar, params: dict, timeout: float = 300) -> dict:
    response = proc.call("train", params, timeout=timeout)
    assert "result" in response, (response, proc.stderr()[-3000:])
    return response["result"]


def job_params(model: Path, out: Path, **extra) -> dict:
    return {"baseModel": str(model), "dataset": chat_dataset(6),
            "validationDataset": chat_dataset(2, fact="Quillport is the capital of Zorbania."), "rank": 4,
            "alpha": 8, "batchSize": 2, "maxSteps": STEPS, "evalEvery": 2, "maxSeqLength": 64,
            "learningRate": 1e-3, "progressInterval": 0, "outputPath": str(out), **extra}


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    with Sidecar(env={"LORA_SIDECAR_DATA": str(tmp_path_factory.mktemp("tb-data"))}) as p:
        yield p


@pytest.fixture(scope="module")
def trained(proc, tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tb") / "adapter"
    return train(proc, job_params(tiny_model_dir, out, jobId="tb-job"))


def test_one_loss_event_per_step_equal_to_the_loss_history(trained):
    out = Path(trained["adapterPath"])
    assert [p.name for p in (out / "runs").iterdir()] == ["tb-job"]
    events = read_events(out / "runs" / "tb-job")
    losses = json.loads((out / "training_metrics.json").read_text())["lossHistory"]
    assert len(losses) == trained["metrics"]["steps"] == STEPS
    assert loss_problems(events, losses) == []
    # The planted error: the same events against the history shifted by one step.
    assert loss_problems(events, losses[1:] + losses[:1]) != []
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["tensorboard"] == "runs/tb-job"
    history = manifest["lossHistory"]
    for tag in PER_STEP:
        assert [s for s, _, _ in events[tag]] == list(range(1, STEPS + 1)), tag
    assert [v for _, v, _ in events["train/learning_rate"]] == [f32(h["learningRate"]) for h in history]
    assert [v for _, v, _ in events["train/epoch"]] == [f32(h["epoch"]) for h in history]
    assert all(v > 0 for _, v, _ in events["train/grad_norm"] + events["train/tokens_per_second"]
               + events["train/rss_mb"])
    assert all(0 <= v <= 1 for _, v, _ in events["train/token_accuracy"])
    walls = [w for _, _, w in events["train/loss"]]
    assert walls == sorted(walls) and walls[-1] - walls[0] < 300  # each step's own clock, not the writer's
    # eval/loss: one event per evaluation of the run, with its value.
    evals = [(v["step"], f32(v["validationLoss"])) for v in manifest["validationHistory"]]
    assert evals and evals[-1][0] == STEPS and len(evals) >= 2
    assert [(s, v) for s, v, _ in events["eval/loss"]] == evals
    assert "train/device_allocated_mb" not in events  # CPU: no device memory figure
    # The package is whole, its sizeMB counting the event files (they were there before it was written).
    assert package_problems(out) == []
    assert not [w for w in trained["warnings"] if "tensorboard" in w]


def test_tensorboard_false_writes_no_runs(proc, tiny_model_dir, tmp_path):
    out = tmp_path / "off"
    result = train(proc, job_params(tiny_model_dir, out, maxSteps=1, tensorboard=False))
    assert not (out / "runs").exists() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "training_manifest.json").read_text())["tensorboard"] is None
    assert not [w for w in result["warnings"] if "tensorboard" in w]


def test_a_cancelled_then_resumed_job_has_one_event_per_step(proc, tiny_model_dir, tmp_path):
    """Cancelled after its first checkpoint (checkpoints every step): the cancelled job leaves no adapter
    and no events; the resumed one writes steps 1..N once each, the earlier steps' figures included."""
    out, job_id, steps = tmp_path / "resumed", "tb-resume", 24
    request = proc.request("train", job_params(tiny_model_dir, out, jobId=job_id, maxSteps=steps,
                                               checkpointEvery=1))
    proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == job_id
                  and m["params"].get("checkpoint") is not None, timeout=300)
    proc.call("cancel", {"jobId": job_id})
    response = proc.response(request, timeout=120)
    if "result" in response:
        pytest.skip("the job finished before the cancel reached it")
    stopped = response["error"]["data"]["stepsCompleted"]
    assert not out.exists() and not list(tmp_path.glob("resumed.tmp-*"))
    result = train(proc, {"resumeFrom": job_id, "progressInterval": 0})
    # (A cancel that lands in an evaluation resumes from the step before it: that step is taken twice,
    # and still has one event.)
    assert 1 <= result["metrics"]["resumedFromStep"] <= stopped < steps
    events = read_events(out / "runs" / job_id)
    losses = json.loads((out / "training_metrics.json").read_text())["lossHistory"]
    assert loss_problems(events, losses) == [] and len(losses) == steps
    for tag in PER_STEP:
        assert [s for s, _, _ in events[tag]] == list(range(1, steps + 1)), tag
    evals = json.loads((out / "training_manifest.json").read_text())["validationHistory"]
    assert [s for s, _, _ in events["eval/loss"]] == [v["step"] for v in evals]


NO_TENSORBOARDX = [sys.executable, "-c", "\n".join([
    "import sys",
    "sys.modules['tensorboardX'] = None  # planted: an environment without the writer",
    "from sidecar.cli import main",
    "sys.exit(main())"])]


def test_without_tensorboardx_the_job_completes_with_one_warning(tiny_model_dir, tmp_path):
    out = tmp_path / "nowriter"
    with Sidecar(argv=NO_TENSORBOARDX, env={"LORA_SIDECAR_DATA": str(tmp_path / "data")}) as p:
        result = train(p, job_params(tiny_model_dir, out, maxSteps=1))
    assert [w for w in result["warnings"] if "tensorboard" in w.lower()] == [
        "tensorboard: no TensorBoard events were written: tensorboardX is not installed in the sidecar's "
        "environment (bootstrap/bootstrap.sh installs it)"]
    assert not (out / "runs").exists() and (out / "manifest.json").is_file()
