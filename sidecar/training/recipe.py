"""The training recipe behind ``train``.

``train`` follows a fixed lifecycle (torchtune's recipe shape):

    check params and read the dataset (fail fast, nothing loaded yet)
    → base model from the warm ModelCache (phase ``loading`` only when it really loads)
    → ``preparing``: tokenize and validate with the model's tokenizer
    → attach LoRA (peft) to the cached base model
    → attach LoRA (peft) to the cached base model (``initFrom``: the parent's weights; ``resumeFrom``:
      the checkpoint's weights, optimizer state, totals and position, and its RNG states just before
      the next step)
    → ``training`` (+ ``evaluating`` at epoch ends, every ``evalEvery`` steps and at the end when
      there is validation data; checkpoints at step boundaries, see training/checkpoint.py)
    → ``saving``: adapter, tokenizer and manifest into ``<target>.tmp-<job>``, renamed into place;
      then the job's checkpoints are deleted
    → finally, whatever happened: LoRA layers removed, the base model exactly as it was.

The loop reads top to bottom in nanoGPT's order: lr → micro-batches (forward, backward) → clip →
step → zero_grad → log → evaluate → checkpoint → stop check. Helpers are defined above it, in the
order they are used. A checkpoint never falls inside a step (gradient accumulation and micro-batch
splitting happen within one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import msgspec

from .. import __version__, data, errors, library_versions, paths, wire
from ..adapters.surgery import attach_lora, detach_lora, snapshot
from ..files import ADAPTER_FILE, MANIFEST_FILE, safe_name, sha256_file, utc_iso
from ..models import apply_thread_setting
from . import bf16, checkpoint, resume
from .early_stop import EarlyStopper
from .loss import evaluate, supports_selective_logits
from .schedule import lr_multiplier
from .world import SINGLE_PROCESS, World

log = logging.getLogger(__name__)

# Measurement switch: LORA_SIDECAR_PEFT_LORA=1 runs peft's own LoRA forward instead of fastlora's.
PEFT_LORA_ENV = "LORA_SIDECAR_PEFT_LORA"
# Default micro-batch budget on CPU, in padded tokens: measured on SmolLM2-135M (docs/PERFORMANCE.md),
# it keeps the activations of a 4 × 255-token batch to half while costing no measurable speed.
CPU_MICRO_BATCH_TOKENS = 512


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def resolve_output_dir(params: wire.TrainParams, job_id: str, now: float) -> Path:
    """``outputPath``, or ``<adapters dir>/<name>-<UTC timestamp>``. An existing non-empty target
    raises OutputExists (checked again just before the final rename)."""
    if params.output_path:
        target = Path(params.output_path).expanduser().absolute()
    else:
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = paths.adapters_dir().absolute() / f"{safe_name(params.name or 'adapter')}-{stamp}"
        if target.exists():  # two jobs within one second: keep both
            target = target.with_name(f"{target.name}-{safe_name(job_id)}")
    _check_target_free(target)
    return target


def _check_target_free(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise errors.OutputExists(f"Output path {target} already exists and is not empty; choose another "
                                  "outputPath or remove it", path=str(target))


@dataclass
class _Progress:
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

    SCALARS = ("step", "epoch", "loss", "lr", "validation_loss", "tokens", "train_seconds", "next_epoch",
               "next_group", "micro_done", "examples_seen", "loss_total", "label_total", "training_wall",
               "checkpoints", "checkpoint_seconds")

    def scalars(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SCALARS}

    def set_scalars(self, values: dict[str, Any]) -> None:
        for k in self.SCALARS:
            setattr(self, k, values[k])

    def state(self) -> dict[str, Any]:
        return {**self.scalars(), "history": self.history, "validationHistory": self.validation_history}

    def restore(self, state: dict[str, Any]) -> None:
        self.set_scalars(state)
        self.history, self.validation_history = list(state["history"]), list(state["validationHistory"])

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
            validation_loss=self.validation_loss, message=message, checkpoint=checkpoint))


def train(params: wire.TrainParams, *, job_id: str, models: Any, report: Callable[[wire.Progress], None],
          should_stop: Callable[[], bool], received_at: float,
          world: World = SINGLE_PROCESS) -> Optional[wire.TrainResult]:
    """Train a LoRA adapter on the cached base model and write it atomically (see the module doc).

    ``report`` may be called often (every micro-step); the caller throttles. ``should_stop`` is
    polled before every micro-batch; when it returns True the job raises RequestCancelled
    (``data: {jobId, stepsCompleted}``) after removing the LoRA layers and any temporary output —
    and, when checkpointing is on, after checkpointing its last completed step.
    Raises DatasetInvalid, InvalidParams, ModelNotFound, ModelLoadFailed, OutOfMemory,
    TrainingFailed, OutputExists, and for resumeFrom / initFrom CheckpointNotFound,
    CheckpointInvalid, ResumeMismatch, AdapterNotFound, AdapterMismatch. In every outcome the cached
    base model is left as it was.

    ``world``: a rank of a worker group (training/world.py) runs the same loop on its share of each
    step; only the main rank writes the adapter and returns the result (the others return None).
    Distributed jobs write no checkpoints (the server refuses resumeFrom, initFrom and
    earlyStopping with ``distributed``).
    """
    import torch

    started_wall, started = time.time(), time.monotonic()
    prog = _Progress(job_id, report, started)
    apply_thread_setting()
    # Distributed jobs keep no checkpoints and no params for resuming (docs/SCALING.md); the server
    # refuses resumeFrom, initFrom and earlyStopping for them.
    durable = world.size == 1
    cadence = checkpoint.Cadence.of(params) if durable else checkpoint.Cadence(0, 0.0, params.keep_checkpoints)
    job_dir = paths.job_dir(job_id)
    on_cancel: list[Callable[[], None]] = []  # the cancel checkpoint, once there is a training state

    def cancelled() -> None:
        for hook in on_cancel:
            hook()
        raise errors.RequestCancelled(f"Job {job_id} cancelled", jobId=job_id, stepsCompleted=prog.step)

    # -- fail fast: params, dataset, resume/parent state and output target before any model load --
    if params.target_modules is not None and not params.target_modules:
        raise errors.InvalidParams("targetModules is empty; omit it for the default", field="targetModules")
    if params.early_stopping is not None and not (params.validation_dataset or params.validation_path
                                                  or params.validation_split):
        raise errors.InvalidParams("earlyStopping needs validation data: validationDataset, validationPath or "
                                   "validationSplit", field="earlyStopping")
    resume_path: Optional[Path] = None
    resume_state: Optional[dict[str, Any]] = None
    if params.resume_from is not None:
        resume_path, _ = checkpoint.locate(params.resume_from)
        if resume_path is not None:
            resume_state = checkpoint.read_state(resume_path)
    parent = None
    if params.init_from is not None and resume_state is None:
        parent = resume.read_parent(params.init_from)
        params = parent.apply(params)
    loaded_data = data.load_train_and_validation(params)
    train_sha = data.dataset_sha256(loaded_data.train)
    val_sha = data.dataset_sha256(loaded_data.validation) if loaded_data.validation else None
    if resume_state is not None:
        resume.check_resume(resume_state, params, job_id=job_id, train_sha256=train_sha, validation_sha256=val_sha)
    target = resolve_output_dir(params, job_id, started_wall)
    job_warnings: list[str] = []
    if durable and (resume_path is None or resume_path.parent.resolve() != job_dir.resolve()):
        checkpoint.clear(job_dir)  # an earlier job's checkpoints under the same id are not this job's
    try:  # what `resumeFrom: <jobId>` continues with, even before the first checkpoint
        if durable:
            checkpoint.save_params(job_dir, job_id, msgspec.structs.replace(params, output_path=str(target)))
    except OSError as exc:
        job_warnings.append(f"The job's params could not be saved in {job_dir} ({exc}); it cannot be resumed.")

    # -- model ------------------------------------------------------------------------------------
    loaded = models.get(params.base_model, device=params.device, dtype=params.dtype,
                        quantize_bits=params.quantize_bits if params.quantize else None,
                        trust_remote_code=params.trust_remote_code, on_loading=lambda: prog.send("loading"))
    if should_stop():  # a load can take a while; do not start preparing a cancelled job
        cancelled()
    job_warnings += loaded.warnings
    fingerprint = loaded.fingerprint()  # before anything is attached
    if resume_state is not None:
        resume.check_resume_base(resume_state, fingerprint)
    if parent is not None:
        resume.check_parent_base(parent, fingerprint, params.base_model)
    parent_record = parent.record() if parent is not None else (resume_state or {}).get("parent")

    # -- data -------------------------------------------------------------------------------------
    prog.send("preparing")
    tokenizer = loaded.tokenizer
    train_items, train_stats = data.tokenize(loaded_data.train, tokenizer, loss_on=params.loss_on,
                                             max_seq_length=params.max_seq_length, metadata=loaded_data.metadata)
    val_items, val_stats = [], None
    if loaded_data.validation:
        val_items, val_stats = data.tokenize(loaded_data.validation, tokenizer, loss_on=params.loss_on,
                                             max_seq_length=params.max_seq_length,
                                             metadata=loaded_data.validation_metadata)
    if train_stats.truncated:
        job_warnings.append(f"{train_stats.truncated} of {train_stats.examples} training examples were longer "
                            f"than maxSeqLength {params.max_seq_length} and were truncated.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lengths = [len(t.input_ids) for t in train_items]
    global_batch = world.global_batch(params.batch_size)
    grouped = params.group_by_length
    if grouped is None:
        grouped = data.grouping_pays(lengths, global_batch, seed=params.seed)
    micro_per_epoch = math.ceil(len(train_items) / global_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / params.gradient_accumulation)
    # maxSteps, when given, is the number of optimizer steps (Hugging Face semantics: it overrides
    # epochs, repeating the data as often as needed); otherwise epochs decide.
    if params.max_steps is not None:
        total_steps, n_epochs = params.max_steps, math.ceil(params.max_steps / steps_per_epoch)
    else:
        total_steps, n_epochs = params.epochs * steps_per_epoch, params.epochs
    prog.total_steps = total_steps

    model = loaded.model
    device = loaded.device
    before = snapshot(model)
    peft_model = None
    tmp: Optional[Path] = None
    renamed = False
    patches = contextlib.ExitStack()  # engine patches on the base model, undone before the LoRA layers go
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    try:
        # -- LoRA ---------------------------------------------------------------------------------
        torch.manual_seed(params.seed)  # LoRA A init and dropout masks (a resume restores its own state)
        peft_model = attach_lora(model, params, loaded.resolved.path)
        if parent is not None:
            resume.load_parent_weights(peft_model, parent)
        lm = peft_model.get_base_model()
        if params.gradient_checkpointing:
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
                lm.activation_checkpointing_enable({"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        selective = supports_selective_logits(lm) and world.selective_logits
        fused_lora = 0
        if os.environ.get(PEFT_LORA_ENV, "").strip() in ("", "0"):
            from . import fastlora

            fused_lora = fastlora.patch(peft_model)
        bf16_layers = 0
        if bf16.wanted(params.dtype, device, loaded.dtype, loaded.key[3] is not None, world.size):
            bf16_layers = patches.enter_context(bf16.bf16_matmuls(lm, loaded.compute_store()))
        micro_tokens = params.micro_batch_tokens
        if micro_tokens is None:
            micro_tokens = CPU_MICRO_BATCH_TOKENS if device == "cpu" else 0
        forward = world.wrap(lm, selective)  # before collecting parameters: FSDP replaces them
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        # Fused AdamW on CUDA, and on CPU for single-process jobs: one kernel over all LoRA tensors instead
        # of foreach ops (measured on CPU for SmolLM2 r8's 420 tensors: 3.3 ms a step instead of 16.2).
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay,
                                      fused=device.startswith("cuda") or (device == "cpu" and world.size == 1) or None)
        stopper = None
        if params.early_stopping is not None:
            stopper = EarlyStopper(params.early_stopping.patience, params.early_stopping.min_delta)
        rng_state = None
        if resume_state is not None:
            rng_state = checkpoint.load_training(peft_model, optimizer, resume_path)
            prog.restore(resume_state["loop"])
            if stopper is not None and resume_state.get("earlyStopping"):
                stopper = EarlyStopper.from_dict(resume_state["earlyStopping"])
            if resume_state.get("device") != device:
                job_warnings.append(f"Resumed on {device}; the checkpoint was written on {resume_state.get('device')}: "
                                    "the result is not bit-identical to an uninterrupted run.")
        resumed_from_step = prog.step if resume_state is not None else None
        if should_stop():
            cancelled()

        # -- checkpoints --------------------------------------------------------------------------
        last_saved = {"step": prog.step, "at": time.monotonic()}

        def save_checkpoint(rng: dict[str, Any]) -> Optional[wire.CheckpointRef]:
            t = time.monotonic()
            prog.training_wall = base_wall + (time.monotonic() - train_started)
            state = {"jobId": job_id, "params": resume.result_params(params), "datasetSha256": train_sha,
                     "validationSha256": val_sha, "baseFingerprint": fingerprint, "device": device,
                     "parent": parent_record, "loop": prog.state(),
                     "earlyStopping": stopper.to_dict() if stopper is not None else None}
            protect = [stopper.best_checkpoint] if stopper is not None and stopper.best_checkpoint else []
            try:
                saved = checkpoint.write(job_dir, step=prog.step, state=state, model=peft_model, optimizer=optimizer,
                                         rng=rng, keep=cadence.keep, protect=protect)
            except OSError as exc:
                log.warning("job %s: checkpoint at step %d failed: %s", job_id, prog.step, exc)
                job_warnings.append(f"The checkpoint at step {prog.step} could not be written: {exc}")
                return None
            spent = time.monotonic() - t
            prog.checkpoints += 1
            prog.checkpoint_seconds += spent
            prog.train_seconds += spent  # it is part of what training costs (tokens/s, eta)
            last_saved.update(step=prog.step, at=time.monotonic())
            prog.send("training", message=f"Checkpoint of step {prog.step} written", checkpoint=saved)
            return saved

        # A cancel in the middle of a step checkpoints the step before it: the weights and the optimizer
        # are still there, and the totals and generator states were kept when the step began.
        boundary: dict[str, Any] = {"scalars": None, "rng": None, "in_step": False}

        def checkpoint_on_cancel() -> None:
            if (cadence.enabled and boundary["in_step"] and boundary["scalars"] is not None
                    and boundary["scalars"]["step"] > last_saved["step"]):
                prog.set_scalars(boundary["scalars"])
                save_checkpoint(boundary["rng"])

        on_cancel.append(checkpoint_on_cancel)

        # -- training -----------------------------------------------------------------------------
        prog.send("training")
        peft_model.train()
        if rng_state is not None:  # right before the first step that follows the checkpoint
            job_warnings += checkpoint.restore_rng(rng_state)
        first_step_at: Optional[float] = None
        train_started, base_wall = time.monotonic(), prog.training_wall
        start_epoch, start_group = prog.next_epoch, prog.next_group
        # A checkpoint taken after the last step (a cancel while saving) or after early stopping resumes
        # straight into saving.
        stopped_early = stopper is not None and stopper.should_stop
        finished = stopped_early or prog.step >= total_steps
        for epoch in range(start_epoch, n_epochs) if not finished else ():
            batches = data.epoch_batches(lengths, global_batch, seed=params.seed, epoch=epoch,
                                         group_by_length=grouped)
            for g in range(start_group if epoch == start_epoch else 0, len(batches), params.gradient_accumulation):
                if prog.step >= total_steps:
                    break
                if cadence.enabled:
                    boundary.update(scalars=prog.scalars(), rng=checkpoint.capture_rng())
                boundary["in_step"] = True
                t_step = time.monotonic()
                group = batches[g:g + params.gradient_accumulation]
                lr = params.learning_rate * lr_multiplier(prog.step, total_steps, params.warmup_ratio,
                                                          params.scheduler)
                for pg in optimizer.param_groups:
                    pg["lr"] = lr
                # Normalise by every label in the optimizer step, not per micro-batch: a short
                # micro-batch must not weigh as much as a long one.
                step_labels = sum(train_items[i].trainable for b in group for i in b)
                step_loss, step_tokens, step_examples = 0.0, 0, 0
                for part in world.micro_batches(group, lengths, micro_tokens):  # this rank's rows
                    if should_stop():
                        cancelled()
                    batch = data.collate(train_items, part.indices, pad_id, device)
                    with world.sync_gradients(part):
                        loss = forward(batch)
                        (loss * part.scale / step_labels).backward()
                    if part.scale:
                        step_loss += loss.item()
                        step_tokens += batch.tokens
                        step_examples += batch.examples
                prog.micro_done += len(group)
                step_loss, step_tokens, step_examples = world.sum(step_loss, step_tokens, step_examples)
                step_tokens = int(step_tokens)
                prog.examples_seen += int(step_examples)
                if params.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                boundary["in_step"] = False

                if not math.isfinite(step_loss):
                    raise errors.TrainingFailed(
                        f"The loss became {step_loss} at step {prog.step + 1}; lower learningRate",
                        jobId=job_id, stepsCompleted=prog.step)
                prog.step += 1
                prog.train_seconds += time.monotonic() - t_step
                prog.tokens += step_tokens
                prog.epoch = prog.micro_done / micro_per_epoch
                prog.loss, prog.lr = step_loss / step_labels, lr
                prog.loss_total += step_loss
                prog.label_total += step_labels
                epoch_end = g + params.gradient_accumulation >= len(batches)
                prog.next_epoch, prog.next_group = (epoch + 1, 0) if epoch_end else (epoch, g + params.gradient_accumulation)
                if first_step_at is None:
                    first_step_at = time.time()
                prog.history.append({"step": prog.step, "epoch": round(prog.epoch, 4), "loss": prog.loss,
                                     "learningRate": lr, "tokens": step_tokens, "labelTokens": step_labels})
                prog.send("training")

                # Evaluation points: the last step, evalEvery, and epoch ends — but when maxSteps
                # repeats a tiny dataset many times, at most about ten epoch-end evaluations in the run.
                finished = prog.step >= total_steps
                since_eval = prog.step - (prog.validation_history[-1]["step"] if prog.validation_history else 0)
                improved = False
                if val_items and (finished or (epoch_end and since_eval >= math.ceil(total_steps / 10))
                                  or (params.eval_every and prog.step % params.eval_every == 0)):
                    prog.send("evaluating")
                    prog.validation_loss = evaluate(lm, val_items, batch_size=params.batch_size, pad_id=pad_id,
                                                    device=device, selective=selective, should_stop=should_stop,
                                                    on_stop=cancelled)
                    prog.validation_history.append({"step": prog.step, "epoch": round(prog.epoch, 4),
                                                    "validationLoss": prog.validation_loss})
                    if stopper is not None:
                        improved = stopper.update(prog.step, prog.validation_loss)
                        if improved:  # the best weights live in their checkpoint from now on
                            stopper.best_checkpoint = str(checkpoint.path_for(job_dir, prog.step))
                    if not finished:
                        prog.send("training")
                if improved or (not finished and cadence.due(prog.step, time.monotonic() - last_saved["at"])):
                    if save_checkpoint(checkpoint.capture_rng()) is None and improved:
                        raise errors.TrainingFailed(f"Early stopping could not checkpoint its best step {prog.step}",
                                                    jobId=job_id, stepsCompleted=prog.step)
                if stopper is not None and stopper.should_stop:
                    stopped_early = finished = True
                if finished:
                    break
            if finished:
                break
        training_seconds = base_wall + time.monotonic() - train_started
        boundary.update(scalars=prog.scalars(), rng=checkpoint.capture_rng(), in_step=True)
        if should_stop():
            cancelled()
        on_cancel.clear()
        if stopper is not None and stopper.best_step is not None and stopper.best_step != prog.step:
            checkpoint.load_weights(peft_model, Path(stopper.best_checkpoint))  # write the best adapter seen

        # -- saving -------------------------------------------------------------------------------
        prog.send("saving")
        peft_model.eval()
        adapter_state = world.adapter_state(peft_model)  # FSDP: gathered by every rank
        if not world.is_main:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{safe_name(job_id)}")
        if tmp.exists():
            shutil.rmtree(tmp)
        peft_model.save_pretrained(str(tmp), safe_serialization=True, state_dict=adapter_state)
        tokenizer.save_pretrained(str(tmp))
        adapter_file = tmp / ADAPTER_FILE
        if not adapter_file.is_file():
            raise errors.TrainingFailed(f"peft did not write {ADAPTER_FILE}", path=str(tmp))

        metrics = wire.TrainMetrics(
            train_loss=prog.loss_total / max(prog.label_total, 1),
            final_loss=prog.loss if prog.loss is not None else float("nan"),
            validation_loss=stopper.best_loss if stopper is not None else prog.validation_loss,
            epochs=round(prog.epoch, 4),
            steps=prog.step,
            training_time=round(training_seconds * 1000),
            examples_processed=prog.examples_seen,
            tokens_per_second=round(prog.tokens / prog.train_seconds, 2) if prog.train_seconds else 0.0,
            trainable_tokens=train_stats.trainable_tokens,
            truncated_examples=train_stats.truncated,
            time_to_first_step_ms=round(((first_step_at or time.time()) - received_at) * 1000),
            load_time_ms=0 if loaded.cached else round(loaded.load_seconds * 1000),
            model_cached=loaded.cached,
            peak_memory_mb=_peak_memory_mb(device),
            resumed_from_step=resumed_from_step,
            best_step=stopper.best_step if stopper is not None else None,
            stopped_early=stopped_early,
        )
        continuity = {
            "resumedFrom": {"checkpoint": str(resume_path), "step": resumed_from_step} if resume_path else None,
            "parent": parent_record,
            "earlyStopping": stopper.report() if stopper is not None else None,
            "stopReason": "earlyStopping" if stopped_early else ("maxSteps" if params.max_steps else "epochs"),
            "checkpointing": {"every": cadence.every, "seconds": cadence.seconds, "keep": cadence.keep,
                              "written": prog.checkpoints, "secondsSpent": round(prog.checkpoint_seconds, 3)},
        }
        finished_wall = time.time()
        manifest = _manifest(
            params=params, job_id=job_id, loaded=loaded, fingerprint=fingerprint, peft_model=peft_model,
            received_at=received_at, started_wall=started_wall, finished_wall=finished_wall,
            train_stats=train_stats, val_stats=val_stats, metrics=metrics, prog=prog, warnings=job_warnings,
            adapter_file=adapter_file, selective=selective, target=target, fused_lora=fused_lora,
            micro_tokens=micro_tokens, world=world, bf16_layers=bf16_layers, grouped=grouped,
        )
        manifest.update(continuity)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _check_target_free(target)
        if target.is_dir():
            target.rmdir()  # an empty directory the caller created for us
        os.rename(tmp, target)
        renamed = True
        # The adapter is the result now: its checkpoints go. params.json stays until the journal has
        # recorded the completion (it then removes the directory), so a crash in between is still
        # recognised as completed at the next start (it names the output path).
        if durable:
            checkpoint.clear(job_dir)
        prog.send("saving", message=f"Adapter written to {target}")
        return wire.TrainResult(job_id=job_id, adapter_path=str(target), manifest_path=str(target / MANIFEST_FILE),
                                metrics=metrics, warnings=job_warnings)
    except errors.SidecarError:
        raise
    except torch.OutOfMemoryError as exc:
        raise errors.OutOfMemory(
            f"Out of memory on {device} while training: reduce batchSize or maxSeqLength, or enable "
            "gradientCheckpointing", device=device, stepsCompleted=prog.step) from exc
    except MemoryError as exc:
        raise errors.OutOfMemory(f"Out of memory while training on {device}: {exc}", device=device,
                                 stepsCompleted=prog.step) from exc
    except Exception as exc:
        log.exception("job %s: training failed", job_id)
        raise errors.TrainingFailed(f"Training failed: {type(exc).__name__}: {exc}", jobId=job_id,
                                    stepsCompleted=prog.step) from exc
    finally:
        patches.close()
        detach_lora(model, peft_model, before)
        if tmp is not None and not renamed:
            shutil.rmtree(tmp, ignore_errors=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _manifest(*, params: wire.TrainParams, job_id: str, loaded: Any, fingerprint: str, peft_model: Any,
              received_at: float, started_wall: float, finished_wall: float, train_stats: data.DatasetStats,
              val_stats: Optional[data.DatasetStats], metrics: wire.TrainMetrics, prog: _Progress,
              warnings: list[str], adapter_file: Path, selective: bool, target: Path,
              fused_lora: int, micro_tokens: int, world: World, bf16_layers: int,
              grouped: bool) -> dict[str, Any]:
    from .. import PROTOCOL_VERSION

    lora = peft_model.peft_config["default"]
    hyper = msgspec.to_builtins(msgspec.structs.replace(params, dataset=None, validation_dataset=None))
    dataset = {"source": params.dataset_path or "inline", **train_stats.to_dict()}
    validation = None
    if val_stats is not None:
        source = params.validation_path or ("inline" if params.validation_dataset else "validationSplit")
        validation = {"source": source, **val_stats.to_dict()}
    return {
        "format": "lora-sidecar.training-manifest/1",
        "jobId": job_id,
        "receivedAt": utc_iso(received_at),
        "startedAt": utc_iso(started_wall),
        "finishedAt": utc_iso(finished_wall),
        "sidecar": {"version": __version__, "protocolVersion": PROTOCOL_VERSION},
        "libraries": library_versions(),
        "baseModel": {
            "name": params.base_model, "kind": loaded.resolved.kind, "path": loaded.resolved.path,
            "ggufFile": loaded.resolved.gguf_file, "fingerprint": fingerprint, "device": loaded.device,
            "dtype": str(loaded.dtype).removeprefix("torch."), "quantizeBits": loaded.key[3],
        },
        "persona": {"personaId": params.persona_id, "personaName": params.persona_name,
                    "traitType": params.trait_type, "name": params.name},
        "hyperparameters": hyper,
        "lora": {"r": lora.r, "loraAlpha": lora.lora_alpha, "targetModules": sorted(lora.target_modules),
                 "dropout": lora.lora_dropout, "useRslora": lora.use_rslora, "useDora": lora.use_dora},
        "dataset": dataset,
        "validation": validation,
        "metrics": msgspec.to_builtins(metrics),
        "lossHistory": prog.history,
        "validationHistory": prog.validation_history,
        "engine": {"selectiveLogits": selective, "groupByLength": grouped,
                   "fusedLoraLayers": fused_lora, "bf16MatmulLayers": bf16_layers, "microBatchTokens": micro_tokens,
                   "gradientCheckpointing": params.gradient_checkpointing, "distributed": world.describe()},
        "warnings": warnings,
        "adapter": {"path": str(target), "file": ADAPTER_FILE, "sha256": sha256_file(adapter_file),
                    "bytes": adapter_file.stat().st_size},
    }

