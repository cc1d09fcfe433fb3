"""What one training job is made of as it runs, as plain objects the recipe passes explicitly.

- ``Prepared``: what the fail-fast prepare found (params, dataset, resume point, parent, output
  target), before any model is loaded;
- ``Base``, ``TrainData``, ``Model``: what setup made of the base model, the data and the LoRA layers;
- ``RunState``: the running figures of the job — progress notifications, the final metrics, and with
  the data position and totals, what a checkpoint saves and a resume restores;
- ``StopSignal``: the cancel poll, and the cancel checkpoint to take before a cancel is raised.

No torch here: setup, the loop, the checkpointer and publish all read these.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

from .. import errors, wire

if TYPE_CHECKING:
    from .. import data
    from ..models import LoadedModel
    from .checkpoint import Cadence
    from .resume import ParentAdapter


@dataclass
class Prepared:
    """A train request made ready for one job, before any model is loaded."""

    job_id: str
    params: wire.TrainParams
    target: Path  # where the adapter goes (free, or an empty directory)
    job_dir: Path
    cadence: Cadence  # when checkpoints are written (by the main rank, in a worker group)
    sources: data.LoadedData
    train_sha256: str
    validation_sha256: Optional[str]
    resume_path: Optional[Path]  # resumeFrom: the checkpoint (None: the job has none yet)
    resume_state: Optional[dict[str, Any]]
    parent: Optional[ParentAdapter]  # initFrom
    warnings: list[str]  # the job's warnings so far; setup and the run add theirs


@dataclass
class Base:
    """The cached base model this job trains on."""

    loaded: LoadedModel
    fingerprint: str  # of the weights, taken before anything is attached
    parent_record: Optional[dict[str, Any]]  # the manifest's ``parent``


@dataclass
class TrainData:
    """The tokenized examples and how the run walks through them."""

    items: list[data.Tokenized]
    stats: data.DatasetStats
    validation_items: list[data.Tokenized]
    validation_stats: Optional[data.DatasetStats]
    pad_id: int
    lengths: list[int]
    global_batch: int  # rows of one micro-step over all ranks
    grouped: bool  # batches grouped by length
    micro_per_epoch: int
    total_steps: int  # optimizer steps of the whole run
    epochs: int  # epochs the run touches (maxSteps may repeat the data)
    micro_tokens: int  # micro-batch budget in padded tokens (0: no split)


@dataclass
class Model:
    """The base model with this job's LoRA layers, ready to train."""

    peft_model: Any
    lm: Any  # the base model under peft (its decoder, LM head, config)
    device: str
    forward: Callable[[Any], Any]  # batch -> loss sum (wrapped by the world when distributed)
    trainable: list[Any]
    selective: bool  # the LM head only where labels are
    fused_lora: int  # LoRA layers on fastlora's branch
    bf16_layers: int  # frozen linears on bf16 matmuls


@dataclass
class RunState:
    """Running figures of one job, turned into wire.Progress and the final metrics; with the data
    position and the totals, also what a checkpoint saves and a resume restores (``state``)."""

    job_id: str
    report: Callable[[wire.Progress], None]
    started: float
    total_steps: int = 0
    step: int = 0
    epoch: float = 0.0
    loss: Optional[float] = None
    lr: Optional[float] = None
    validation_loss: Optional[float] = None
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    validation_history: list[dict[str, Any]] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)  # each step's other figures (record_step)
    # Data position: the epoch and the index in its seeded batch order of the next step's first batch.
    next_epoch: int = 0
    next_group: int = 0
    micro_done: int = 0
    examples_seen: int = 0
    loss_total: float = 0.0
    label_total: int = 0
    training_wall: float = 0.0  # seconds of the training phase in earlier processes (a resumed job)
    checkpoints: int = 0
    checkpoint_seconds: float = 0.0
    # This process only (never checkpointed):
    grad_norm: Optional[float] = None  # the last step's, before clipping
    token_accuracy: Optional[float] = None  # the last step's next-token accuracy on its label tokens
    resumed_from_step: Optional[int] = None
    first_step_at: Optional[float] = None  # wall clock
    clock: tuple[float, float] = (0.0, 0.0)  # (monotonic start of training here, training_wall then)

    SCALARS = ("step", "epoch", "loss", "lr", "validation_loss", "tokens", "train_seconds", "next_epoch",
               "next_group", "micro_done", "examples_seen", "loss_total", "label_total", "training_wall",
               "checkpoints", "checkpoint_seconds")

    def scalars(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SCALARS}

    def set_scalars(self, values: dict[str, Any]) -> None:
        for k in self.SCALARS:
            setattr(self, k, values[k])

    def state(self) -> dict[str, Any]:
        return {**self.scalars(), "history": self.history, "validationHistory": self.validation_history,
                "stepFigures": self.figures}

    def restore(self, state: dict[str, Any]) -> None:
        self.set_scalars(state)
        self.history, self.validation_history = list(state["history"]), list(state["validationHistory"])
        self.figures = list(state.get("stepFigures", []))  # a checkpoint from before they were kept has none

    def record_step(self, *, tokens: int, seconds: float) -> None:
        """Keep the figures of the step just counted that the loss history does not hold (the job's
        TensorBoard events are written from both, training/tensorboard.py): wall clock, gradient norm,
        token accuracy, the step's own tokens/s and the process's memory."""
        mem = memory_now()
        self.figures.append({"step": self.step, "time": round(time.time(), 3), "gradNorm": self.grad_norm,
                             "tokenAccuracy": self.token_accuracy,
                             "tokensPerSecond": round(tokens / seconds, 2) if seconds > 0 else None,
                             "rssMb": mem.rss_mb, "deviceAllocatedMb": mem.device_allocated_mb})

    def start_clock(self) -> None:
        """Training starts in this process (after earlier processes' ``training_wall`` seconds)."""
        self.clock = (time.monotonic(), self.training_wall)

    def training_time(self) -> float:
        """Seconds of the training phase so far, earlier processes included."""
        started, before = self.clock
        return before + time.monotonic() - started

    def send(self, phase: str, message: Optional[str] = None,
             checkpoint: Optional[wire.CheckpointRef] = None) -> None:
        tps = self.tokens / self.train_seconds if self.train_seconds > 0 else None
        eta = None
        if self.step and self.total_steps:
            eta = round(self.train_seconds / self.step * (self.total_steps - self.step), 2)
        self.report(wire.Progress(
            job_id=self.job_id, phase=phase, step=self.step, total_steps=self.total_steps,
            epoch=round(self.epoch, 4), loss=self.loss, learning_rate=self.lr,
            tokens_per_second=round(tps, 2) if tps is not None else None,
            elapsed_seconds=round(time.monotonic() - self.started, 3), eta_seconds=eta,
            validation_loss=self.validation_loss, message=message, checkpoint=checkpoint, memory=memory_now(),
            grad_norm=self.grad_norm, token_accuracy=self.token_accuracy))


def memory_now() -> wire.MemoryNow:
    """This process's memory now: RSS (Linux ``/proc/self/statm``, else the peak so far), and on CUDA
    the allocator's current and peak bytes (the peak is reset when a job starts)."""
    rss = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = peak / (2**20 if sys.platform == "darwin" else 2**10)
        except (ImportError, OSError):
            pass
    allocated = peak_dev = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        allocated = round(torch.cuda.memory_allocated() / 2**20, 1)
        peak_dev = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return wire.MemoryNow(rss_mb=round(rss, 1) if rss is not None else None, device_allocated_mb=allocated,
                          device_peak_mb=peak_dev)


class StopSignal:
    """``should_stop`` polled by the job; a stop raises RequestCancelled (``data: {jobId,
    stepsCompleted}``) after ``on_cancel`` (the cancel checkpoint, once there is a training state)."""

    def __init__(self, run: RunState, should_stop: Callable[[], bool]) -> None:
        self.run = run
        self.should_stop = should_stop
        self.on_cancel: Optional[Callable[[], None]] = None

    def poll(self) -> None:
        if self.should_stop():
            self.cancel()

    def cancel(self) -> NoReturn:
        if self.on_cancel is not None:
            self.on_cancel()  # may put the run back to the last step boundary
        raise errors.RequestCancelled(f"Job {self.run.job_id} cancelled", jobId=self.run.job_id,
                                      stepsCompleted=self.run.step)
