"""Early stopping on the validation loss: the bookkeeping, apart from the loop.

An evaluation *improves* when its loss is below the best so far by more than ``min_delta``; after
``patience`` evaluations in a row without improvement the job stops. Each improvement is saved as
a checkpoint (kept whatever ``keepCheckpoints`` says), and the adapter written at the end is the
best checkpoint's weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass
class EarlyStopper:
    patience: int
    min_delta: float
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    best_checkpoint: Optional[str] = None
    bad_evaluations: int = 0
    stopped_at: Optional[int] = None

    def update(self, step: int, loss: float) -> bool:
        """Record the evaluation after ``step``; True when it is a new best."""
        if self.best_loss is None or loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_evaluations = loss, step, 0
            return True
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            self.stopped_at = step
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EarlyStopper":
        return cls(**d)

    def report(self) -> dict[str, Any]:
        """For the manifest: which step's adapter was written and why training stopped."""
        reason = (f"validation loss did not improve by more than {self.min_delta} for {self.patience} "
                  f"evaluations" if self.should_stop else "the last step was reached")
        return {"patience": self.patience, "minDelta": self.min_delta, "stopped": self.should_stop,
                "stoppedAtStep": self.stopped_at, "bestStep": self.best_step,
                "bestValidationLoss": self.best_loss, "reason": reason}
