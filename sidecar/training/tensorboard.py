"""A job's step and validation scalars as TensorBoard event files: ``<adapter>/runs/<job>/``.

``tensorboard --logdir <adapters dir>`` then shows every job's curves side by side. Written when the
adapter is (training/publish.py calls ``write_events`` on the temporary directory before the rename),
from what the run recorded at each step and checkpointed with it (``RunState.history``,
``validation_history``, ``figures``), so:

- the events appear with the adapter or not at all — a cancelled or failed job leaves none;
- a resumed job's events continue the same run: steps 1..N come from the checkpoint, N+1.. from this
  process, one event per tag and step, never two (a stream written during training would repeat the
  steps a crash had taken after its last checkpoint);
- the training loop pays nothing but keeping a few numbers a step.

Scalars, at the optimizer step (``step``) and the step's wall clock: ``train/loss``,
``train/learning_rate``, ``train/epoch``, ``train/grad_norm`` (before clipping),
``train/token_accuracy``, ``train/tokens_per_second`` (the step's own), ``train/rss_mb``,
``train/device_allocated_mb`` (CUDA) and ``eval/loss`` at each evaluation. A figure the step did
not have (no norm, or a step from a checkpoint made before figures were kept) is left out.

The writer is tensorboardX (a runtime dependency; it imports torch, so it is imported here only when
a job writes). Without it the job still completes, with a warning and no events. No torch at import.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from ..files import safe_name

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
NO_WRITER = ("tensorboard: no TensorBoard events were written: tensorboardX is not installed in the "
             "sidecar's environment (bootstrap/bootstrap.sh installs it)")

# (tag, key) of RunState.history and of RunState.figures entries
HISTORY_TAGS = (("train/loss", "loss"), ("train/learning_rate", "learningRate"), ("train/epoch", "epoch"))
FIGURE_TAGS = (("train/grad_norm", "gradNorm"), ("train/token_accuracy", "tokenAccuracy"),
               ("train/tokens_per_second", "tokensPerSecond"), ("train/rss_mb", "rssMb"),
               ("train/device_allocated_mb", "deviceAllocatedMb"))


def run_dir(adapter_dir: Path, job_id: str) -> Path:
    return adapter_dir / RUNS_DIR / safe_name(job_id)


def scalars(history: list[dict[str, Any]], validation: list[dict[str, Any]],
            figures: list[dict[str, Any]]) -> Iterator[tuple[str, float, int, Optional[float]]]:
    """(tag, value, step, wall time or None) of every event, in step order, one per tag and step
    (should a list hold a step twice, its last entry counts)."""
    last = max((h["step"] for h in history), default=0)
    by_step = {f["step"]: f for f in figures if f["step"] <= last}
    wall = {s: f.get("time") for s, f in by_step.items()}
    rows = [(tag, h["step"], h.get(key)) for h in {h["step"]: h for h in history}.values() for tag, key in HISTORY_TAGS]
    rows += [(tag, s, f.get(key)) for s, f in by_step.items() for tag, key in FIGURE_TAGS]
    rows += [("eval/loss", v["step"], v.get("validationLoss"))
             for v in {v["step"]: v for v in validation if v["step"] <= last}.values()]
    for tag, step, value in sorted(rows, key=lambda r: r[1]):
        if value is not None and math.isfinite(value):
            yield tag, float(value), int(step), wall.get(step)


def write_events(adapter_dir: Path, job_id: str, history: list[dict[str, Any]],
                 validation: list[dict[str, Any]], figures: list[dict[str, Any]]) -> tuple[Optional[Path], Optional[str]]:
    """Write the run's events under ``adapter_dir/runs/<job>/``. Returns (that directory, None), or
    (None, a warning) when tensorboardX is missing or the write failed — then nothing is left there:
    the events are worth less than the adapter they describe."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None, NO_WRITER
    target = run_dir(adapter_dir, job_id)
    try:
        # Everything is written at once, then closed: a large queue and no timed flushes.
        writer = SummaryWriter(logdir=str(target), max_queue=4096, flush_secs=3600)
        try:
            for tag, value, step, wall in scalars(history, validation, figures):
                writer.add_scalar(tag, value, global_step=step, walltime=wall)
        finally:
            writer.close()
    except Exception as exc:  # a failing writer (disk full, a broken install) must not fail the job
        log.warning("job %s: TensorBoard events not written: %s", job_id, exc, exc_info=True)
        shutil.rmtree(adapter_dir / RUNS_DIR, ignore_errors=True)
        return None, f"tensorboard: the TensorBoard events could not be written ({type(exc).__name__}: {exc})"
    return target, None
