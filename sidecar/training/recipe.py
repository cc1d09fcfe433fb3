"""The training recipe behind ``train``: one job, in a fixed lifecycle (torchtune's recipe shape).

    prepare   the request made ready, the dataset read, the resume point and the parent adapter
              checked, the output target free — nothing loaded yet (training/setup.py)
    setup     the base model from the warm ModelCache (phase ``loading`` only when it really loads)
              → ``preparing``: tokenize with the model's tokenizer → LoRA layers (``initFrom``: the
              parent's weights; ``resumeFrom``: the checkpoint's weights, optimizer state, totals and
              position, and its RNG states just before the next step) → AdamW
    loop      ``training`` (+ ``evaluating`` at epoch ends, every ``evalEvery`` steps and at the end
              when there is validation data), in nanoGPT's order (training/loop.py); checkpoints at
              step boundaries (training/checkpointer.py)
    publish   ``saving``: adapter, tokenizer and manifest into ``<target>.tmp-<job>``, renamed into
              place; then the job's checkpoints are deleted (training/publish.py)
    cleanup   whatever happened: LoRA layers removed, the base model exactly as it was.

The request was checked at the door (training/checks.py); the recipe trusts it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator, Optional

import torch

from .. import errors, wire
from ..adapters.surgery import detach_lora, snapshot
from ..models import apply_thread_setting
from . import checkpoint, loop, publish, setup
from .checkpointer import Checkpointer
from .state import RunState, StopSignal
from .world import SINGLE_PROCESS, World

log = logging.getLogger(__name__)


def train(params: wire.TrainParams, *, job_id: str, models: Any, report: Callable[[wire.Progress], None],
          should_stop: Callable[[], bool], received_at: float,
          world: World = SINGLE_PROCESS) -> Optional[wire.TrainResult]:
    """Train a LoRA adapter on the cached base model and write it atomically (see the module doc).

    ``params`` has passed ``checks.check_request``. ``report`` may be called often (every
    micro-step); the caller throttles. ``should_stop`` is polled before every micro-batch; when it
    returns True the job raises RequestCancelled (``data: {jobId, stepsCompleted}``) after removing
    the LoRA layers and any temporary output — and, when checkpointing is on, after checkpointing its
    last completed step. Raises DatasetInvalid, InvalidParams, ModelNotFound, ModelLoadFailed,
    OutOfMemory, TrainingFailed, OutputExists, and for resumeFrom / initFrom CheckpointNotFound,
    CheckpointInvalid, ResumeMismatch, AdapterNotFound, AdapterMismatch. In every outcome the cached
    base model is left as it was.

    ``world``: a rank of a worker group (training/world.py) runs the same loop on its share of each
    step; only the main rank writes the adapter, its checkpoints and params, and returns the result
    (the others return None).
    """
    started_wall = time.time()
    run = RunState(job_id, report, time.monotonic())
    stop = StopSignal(run, should_stop)
    apply_thread_setting()
    job = setup.prepare(params, job_id=job_id, world=world, now=started_wall)
    base = setup.load_base(job, models, run, stop)
    run.send("preparing")
    d = setup.setup_data(job, base, world)
    run.total_steps = d.total_steps
    device = base.loaded.device
    before = snapshot(base.loaded.model)
    peft_model = None
    patches = contextlib.ExitStack()  # engine patches on the base model, undone before the LoRA layers go
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        with _as_job_errors(job_id, device, run):
            peft_model = setup.attach(base, job.params)
            model = setup.setup_model(peft_model, job, base, world, patches)
            optimizer = setup.setup_optimizer(model, job.params, device, world)
            stopper, rng_state = setup.restore(job, model, optimizer, run, device, world)
            stop.poll()
            ckpt = Checkpointer(job, base, run, model=peft_model, optimizer=optimizer, stopper=stopper, world=world)
            stop.on_cancel = ckpt.checkpoint_on_cancel

            run.send("training")
            peft_model.train()
            if rng_state is not None:  # right before the first step that follows the checkpoint
                job.warnings += checkpoint.restore_rng(rng_state)
            run.start_clock()
            loop.train_loop(job.params, d, model, optimizer, world, run, ckpt, stop)
            training_seconds = run.training_time()
            ckpt.hold_final_state()
            stop.poll()
            stop.on_cancel = None
            ckpt.restore_best()  # early stopping: the adapter written is the best one seen

            run.send("saving")
            peft_model.eval()
            adapter_state = world.adapter_state(peft_model)  # FSDP: gathered by every rank
            if not world.is_main:
                return None
            return publish.write_adapter(job=job, base=base, data=d, model=model, run=run, ckpt=ckpt, world=world,
                                         adapter_state=adapter_state, received_at=received_at,
                                         started_wall=started_wall, training_seconds=training_seconds)
    finally:
        patches.close()
        detach_lora(base.loaded.model, peft_model, before)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _as_job_errors(job_id: str, device: str, run: RunState) -> Iterator[None]:
    """Any failure once the LoRA layers go on becomes a sidecar error naming the steps completed."""
    try:
        yield
    except errors.SidecarError:
        raise
    except torch.OutOfMemoryError as exc:
        raise errors.OutOfMemory(
            f"Out of memory on {device} while training: reduce batchSize or maxSeqLength, or enable "
            "gradientCheckpointing", device=device, stepsCompleted=run.step) from exc
    except MemoryError as exc:
        raise errors.OutOfMemory(f"Out of memory while training on {device}: {exc}", device=device,
                                 stepsCompleted=run.step) from exc
    except Exception as exc:
        log.exception("job %s: training failed", job_id)
        raise errors.TrainingFailed(f"Training failed: {type(exc).__name__}: {exc}", jobId=job_id,
                                    stepsCompleted=run.step) from exc
