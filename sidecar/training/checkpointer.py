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
from .world import World

log = logging.getLogger(__name__)


class Checkpointer:
    """The checkpoints of one job's run (``job.cadence``). In a worker group every rank runs it at the
    same points: the decisions are taken together (``World.agree``, ``World.main_value``), the state
    is gathered whole, and the main rank writes it."""

    def __init__(self, job: Prepared, base: Base, run: RunState, *, model: Any, optimizer: Any,
                 stopper: Optional[EarlyStopper], world: World) -> None:
        self.job, self.base, self.run, self.world = job, base, run, world
        self.model, self.optimizer, self.stopper = model, optimizer, stopper
        self.cadence: checkpoint.Cadence = job.cadence
        self.last_step, self.last_at = run.step, time.monotonic()
        # The run as it was when the current step began, for the cancel checkpoint.
        self.boundary: Optional[tuple[dict[str, Any], dict[str, Any]]] = None  # (run scalars, RNG states)
        self.in_step = False
        self.written = False  # the last save succeeded (on every rank alike)

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
        # Every rank evaluates; the main rank's loss decides for all, so they stop at the same step.
        loss = self.world.main_value(self.run.validation_loss)
        improved = self.stopper.update(self.run.step, loss)
        if improved:  # the best weights live in their checkpoint from now on
            self.stopper.best_checkpoint = str(checkpoint.path_for(self.job.job_dir, self.run.step))
        return improved

    def after_step(self, *, improved: bool, finished: bool) -> None:
        """Checkpoint a new best, or when the cadence says so (not after the last step)."""
        run = self.run
        due = not finished and self.cadence.due(run.step, time.monotonic() - self.last_at)
        if improved or self.world.agree(due):  # (the seconds since the last one differ between ranks)
            self.save(checkpoint.capture_rng())
            if not self.written and improved:
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
            path = Path(s.best_checkpoint)
            self.world.load_training_state(self.model, self.optimizer, checkpoint.read_weights(path), None, path)

    # --- write ------------------------------------------------------------------------------------

    def save(self, rng: dict[str, Any]) -> Optional[wire.CheckpointRef]:
        """Checkpoint the run as it is (``rng``: this process's generator states that go with it); the
        main rank returns the checkpoint, or None with a warning when it could not be written. Sets
        ``written`` on every rank alike."""
        job, run, stopper, world = self.job, self.run, self.stopper, self.world
        t = time.monotonic()
        run.training_wall = run.training_time()
        weights, optimizer_state = world.training_state(self.model, self.optimizer)  # FSDP: gathered
        rng = world.gather_rng(rng)  # every rank's
        saved, failure = None, None
        if world.is_main:
            state = {"jobId": job.job_id, "params": resume.result_params(job.params),
                     "datasetSha256": job.train_sha256, "validationSha256": job.validation_sha256,
                     "baseFingerprint": self.base.fingerprint, "device": self.base.loaded.device,
                     "world": world.describe(), "parent": self.base.parent_record, "loop": run.state(),
                     "earlyStopping": stopper.to_dict() if stopper is not None else None}
            protect = [stopper.best_checkpoint] if stopper is not None and stopper.best_checkpoint else []
            try:
                saved = checkpoint.write(job.job_dir, step=run.step, state=state, weights=weights,
                                         optimizer_state=optimizer_state, rng=rng, keep=self.cadence.keep,
                                         protect=protect)
            except OSError as exc:
                failure = exc
        # No rank goes on as if a checkpoint existed that the main rank could not write.
        self.written = not world.agree(failure is not None)
        if not self.written:
            log.warning("job %s: checkpoint at step %d failed: %s", job.job_id, run.step, failure)
            job.warnings.append(f"The checkpoint at step {run.step} could not be written: {failure}")
            return None
        spent = time.monotonic() - t
        run.checkpoints += 1
        run.checkpoint_seconds += spent
        run.train_seconds += spent  # it is part of what training costs (tokens/s, eta)
        self.last_step, self.last_at = run.step, time.monotonic()
        if saved is not None:
            run.send("training", message=f"Checkpoint of step {run.step} written", checkpoint=saved)
        return saved
