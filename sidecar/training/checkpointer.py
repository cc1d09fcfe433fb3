"""When a training job checkpoints, and what: the cadence, the cancel checkpoint, the best step.

- Cadence: every ``checkpointEvery`` steps and/or after ``checkpointSeconds`` of training since the
  last checkpoint (training/checkpoint.py ``Cadence``), never after the last step.
- Cancel: a cancel in the middle of a step checkpoints the step before it — the weights and the
  optimizer are still there, and the totals and generator states were kept when the step began.
- Best: with early stopping, every improvement of the validation loss is checkpointed (kept whatever
  ``keepCheckpoints`` says), and the adapter written at the end is the best checkpoint's weights.

A checkpoint never falls inside a step. How a checkpoint is written and read is checkpoint.py's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from .. import errors, wire
from . import checkpoint, resume
from .early_stop import EarlyStopper
from .state import Base, Prepared, RunState

log = logging.getLogger(__name__)


class Checkpointer:
    """The checkpoints of one job's run (``job.cadence``; a distributed job's never writes)."""

    def __init__(self, job: Prepared, base: Base, run: RunState, *, model: Any, optimizer: Any,
                 stopper: Optional[EarlyStopper]) -> None:
        self.job, self.base, self.run = job, base, run
        self.model, self.optimizer, self.stopper = model, optimizer, stopper
        self.cadence: checkpoint.Cadence = job.cadence
        self.last_step, self.last_at = run.step, time.monotonic()
        # The run as it was when the current step began, for the cancel checkpoint.
        self.boundary: Optional[tuple[dict[str, Any], dict[str, Any]]] = None  # (run scalars, RNG states)
        self.in_step = False

    @property
    def stopped_early(self) -> bool:
        return self.stopper is not None and self.stopper.should_stop

    # --- around each step ------------------------------------------------------------------------

    def step_begins(self) -> None:
        if self.cadence.enabled:
            self.boundary = (self.run.scalars(), checkpoint.capture_rng())
        self.in_step = True

    def step_ends(self) -> None:
        self.in_step = False

    def evaluated(self) -> bool:
        """Record the evaluation just made for early stopping; True when it is a new best."""
        if self.stopper is None:
            return False
        improved = self.stopper.update(self.run.step, self.run.validation_loss)
        if improved:  # the best weights live in their checkpoint from now on
            self.stopper.best_checkpoint = str(checkpoint.path_for(self.job.job_dir, self.run.step))
        return improved

    def after_step(self, *, improved: bool, finished: bool) -> None:
        """Checkpoint a new best, or when the cadence says so (not after the last step)."""
        run = self.run
        if improved or (not finished and self.cadence.due(run.step, time.monotonic() - self.last_at)):
            if self.save(checkpoint.capture_rng()) is None and improved:
                raise errors.TrainingFailed(f"Early stopping could not checkpoint its best step {run.step}",
                                            jobId=self.job.job_id, stepsCompleted=run.step)

    # --- cancel and the end -------------------------------------------------------------------------

    def checkpoint_on_cancel(self) -> None:
        """A cancel inside a step: checkpoint the step before it, unless it is checkpointed already."""
        if self.cadence.enabled and self.in_step and self.boundary is not None:
            scalars, rng = self.boundary
            if scalars["step"] > self.last_step:
                self.run.set_scalars(scalars)
                self.save(rng)

    def hold_final_state(self) -> None:
        """After the last step: a cancel from here on checkpoints it (a resume then goes straight to
        saving)."""
        self.boundary = (self.run.scalars(), checkpoint.capture_rng())
        self.in_step = True

    def restore_best(self) -> None:
        """Early stopping: put the best step's weights back when a later step was the last."""
        s = self.stopper
        if s is not None and s.best_step is not None and s.best_step != self.run.step:
            checkpoint.load_weights(self.model, Path(s.best_checkpoint))

    # --- write ------------------------------------------------------------------------------------

    def save(self, rng: dict[str, Any]) -> Optional[wire.CheckpointRef]:
        """Checkpoint the run as it is (``rng``: the generator states that go with it); None, with a
        warning, when it could not be written."""
        job, run, stopper = self.job, self.run, self.stopper
        t = time.monotonic()
        run.training_wall = run.training_time()
        state = {"jobId": job.job_id, "params": resume.result_params(job.params),
                 "datasetSha256": job.train_sha256, "validationSha256": job.validation_sha256,
                 "baseFingerprint": self.base.fingerprint, "device": self.base.loaded.device,
                 "parent": self.base.parent_record, "loop": run.state(),
                 "earlyStopping": stopper.to_dict() if stopper is not None else None}
        protect = [stopper.best_checkpoint] if stopper is not None and stopper.best_checkpoint else []
        try:
            saved = checkpoint.write(job.job_dir, step=run.step, state=state, model=self.model,
                                     optimizer=self.optimizer, rng=rng, keep=self.cadence.keep, protect=protect)
        except OSError as exc:
            log.warning("job %s: checkpoint at step %d failed: %s", job.job_id, run.step, exc)
            job.warnings.append(f"The checkpoint at step {run.step} could not be written: {exc}")
            return None
        spent = time.monotonic() - t
        run.checkpoints += 1
        run.checkpoint_seconds += spent
        run.train_seconds += spent  # it is part of what training costs (tokens/s, eta)
        self.last_step, self.last_at = run.step, time.monotonic()
        run.send("training", message=f"Checkpoint of step {run.step} written", checkpoint=saved)
        return saved
