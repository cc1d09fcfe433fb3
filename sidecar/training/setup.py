"""Setting a training job up, in the recipe's order (torchtune's ``setup`` and ``_setup_*``):

- ``prepare``: fail fast before any model is loaded — dataset, resume point, parent adapter, output
  target; the job's ``params.json`` (what ``resumeFrom: <jobId>`` continues with);
- ``load_base``: the base model from the warm cache, checked against the resume point and the parent;
- ``setup_data``: tokenize with the model's tokenizer, and the run's length in steps;
- ``attach``, ``setup_model``, ``setup_optimizer``: LoRA layers, the engine's patches, AdamW;
- ``restore``: early stopping, and on ``resumeFrom`` the checkpoint's weights, optimizer state and
  totals (its RNG states are put back by the recipe right before the next step).

The request itself was checked at the door (training/checks.py ``check_request``); what only the
job can know (dataset contents, the base model's fingerprint) is checked here.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Optional

import msgspec
import torch

from .. import data, errors, paths, wire
from ..adapters.surgery import attach_lora
from . import bf16, checkpoint, fastlora, publish, resume
from .early_stop import EarlyStopper
from .loss import supports_selective_logits
from .state import Base, Model, Prepared, RunState, StopSignal, TrainData
from .world import World

# Measurement switch: LORA_SIDECAR_PEFT_LORA=1 runs peft's own LoRA forward instead of fastlora's.
PEFT_LORA_ENV = "LORA_SIDECAR_PEFT_LORA"
# Default micro-batch budget on CPU, in padded tokens: measured on SmolLM2-135M (docs/PERFORMANCE.md),
# it keeps the activations of a 4 × 255-token batch to half while costing no measurable speed.
CPU_MICRO_BATCH_TOKENS = 512


def prepare(params: wire.TrainParams, *, job_id: str, world: World, now: float) -> Prepared:
    """Everything that can fail before a model is loaded: checkpoint and parent adapter, dataset,
    output target. Clears an earlier job's checkpoints under the same id and saves ``params.json``."""
    # In a worker group the main rank alone writes to the job directory (params, checkpoints); every
    # rank reads the resume point.
    cadence = checkpoint.Cadence.of(params)
    job_dir = paths.job_dir(job_id)
    _assert_checked(params)
    resume_path, resume_state = resume.resume_point(params)  # the checkpoint the door located
    parent = None
    if params.init_from is not None and resume_state is None:
        parent = resume.read_parent(params.init_from)
        assert parent.apply(params) == params, "the door adopts the parent's LoRA shape (checks.check_request)"
    sources = data.load_train_and_validation(params)
    train_sha = data.dataset_sha256(sources.train)
    val_sha = data.dataset_sha256(sources.validation) if sources.validation else None
    if resume_state is not None:
        resume.check_resume(resume_state, params, job_id=job_id, train_sha256=train_sha, validation_sha256=val_sha)
    target = publish.resolve_output_dir(params, job_id, now)
    warnings: list[str] = []
    owner = world.is_main
    if owner and (resume_path is None or resume_path.parent.resolve() != job_dir.resolve()):
        checkpoint.clear(job_dir)  # an earlier job's checkpoints under the same id are not this job's
    try:  # what `resumeFrom: <jobId>` continues with, even before the first checkpoint
        if owner:
            checkpoint.save_params(job_dir, job_id, msgspec.structs.replace(params, output_path=str(target)))
    except OSError as exc:
        warnings.append(f"The job's params could not be saved in {job_dir} ({exc}); it cannot be resumed.")
    return Prepared(job_id=job_id, params=params, target=target, job_dir=job_dir,
                    cadence=cadence, sources=sources, train_sha256=train_sha, validation_sha256=val_sha,
                    resume_path=resume_path, resume_state=resume_state, parent=parent, warnings=warnings)


def _assert_checked(params: wire.TrainParams) -> None:
    """What ``checks.check_request`` guarantees; the engine trusts it."""
    assert params.target_modules is None or params.target_modules, "targetModules is checked at the door"
    assert params.early_stopping is None or bool(
        params.validation_dataset or params.validation_path or params.validation_split), \
        "earlyStopping's validation data is checked at the door"


def load_base(job: Prepared, models: Any, run: RunState, stop: StopSignal) -> Base:
    """The base model from the warm cache (phase ``loading`` only when it really loads), checked
    against what the job continues from."""
    p = job.params
    loaded = models.get(p.base_model, device=p.device, dtype=p.dtype,
                        quantize_bits=p.quantize_bits if p.quantize else None,
                        trust_remote_code=p.trust_remote_code, on_loading=lambda: run.send("loading"))
    stop.poll()  # a load can take a while; do not start preparing a cancelled job
    job.warnings += loaded.warnings
    fingerprint = loaded.fingerprint()  # before anything is attached
    if job.resume_state is not None:
        resume.check_resume_base(job.resume_state, fingerprint)
    if job.parent is not None:
        resume.check_parent_base(job.parent, fingerprint, p.base_model)
    parent_record = job.parent.record() if job.parent is not None else (job.resume_state or {}).get("parent")
    return Base(loaded, fingerprint, parent_record)


def setup_data(job: Prepared, base: Base, world: World) -> TrainData:
    """Tokenize with the model's tokenizer; how many steps the run takes and how it batches."""
    p, sources, tokenizer = job.params, job.sources, base.loaded.tokenizer
    items, stats = data.tokenize(sources.train, tokenizer, loss_on=p.loss_on, max_seq_length=p.max_seq_length,
                                 metadata=sources.metadata)
    val_items, val_stats = [], None
    if sources.validation:
        val_items, val_stats = data.tokenize(sources.validation, tokenizer, loss_on=p.loss_on,
                                             max_seq_length=p.max_seq_length, metadata=sources.validation_metadata)
    if stats.truncated:
        job.warnings.append(f"{stats.truncated} of {stats.examples} training examples were longer "
                            f"than maxSeqLength {p.max_seq_length} and were truncated.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lengths = [len(t.input_ids) for t in items]
    global_batch = world.global_batch(p.batch_size)
    grouped = p.group_by_length
    if grouped is None:
        grouped = data.grouping_pays(lengths, global_batch, seed=p.seed)
    micro_per_epoch = math.ceil(len(items) / global_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / p.gradient_accumulation)
    # maxSteps, when given, is the number of optimizer steps (Hugging Face semantics: it overrides
    # epochs, repeating the data as often as needed); otherwise epochs decide.
    if p.max_steps is not None:
        total_steps, epochs = p.max_steps, math.ceil(p.max_steps / steps_per_epoch)
    else:
        total_steps, epochs = p.epochs * steps_per_epoch, p.epochs
    micro_tokens = p.micro_batch_tokens
    if micro_tokens is None:
        micro_tokens = CPU_MICRO_BATCH_TOKENS if base.loaded.device == "cpu" else 0
    return TrainData(items=items, stats=stats, validation_items=val_items, validation_stats=val_stats,
                     pad_id=pad_id, lengths=lengths, global_batch=global_batch, grouped=grouped,
                     micro_per_epoch=micro_per_epoch, total_steps=total_steps, epochs=epochs,
                     micro_tokens=micro_tokens)


def attach(base: Base, params: wire.TrainParams) -> Any:
    """LoRA layers on the cached base model; returns the PeftModel (detach_lora takes them off)."""
    torch.manual_seed(params.seed)  # LoRA A init and dropout masks (a resume restores its own state)
    return attach_lora(base.loaded.model, params, base.loaded.resolved.path)


def setup_model(peft_model: Any, job: Prepared, base: Base, world: World,
                patches: contextlib.ExitStack) -> Model:
    """The parent's weights (``initFrom``), gradient checkpointing, and the engine's patches: fastlora's
    branch, bf16 matmuls (entered on ``patches``, undone before the LoRA layers go)."""
    p, loaded = job.params, base.loaded
    if job.parent is not None:
        resume.load_parent_weights(peft_model, job.parent)
    lm = peft_model.get_base_model()
    if p.gradient_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    selective = supports_selective_logits(lm) and world.selective_logits
    fused_lora = 0
    if os.environ.get(PEFT_LORA_ENV, "").strip() in ("", "0"):
        fused_lora = fastlora.patch(peft_model)
    bf16_layers = 0
    if bf16.wanted(p.dtype, loaded.device, loaded.dtype, loaded.key.quantize_bits is not None, world.size):
        bf16_layers = patches.enter_context(bf16.bf16_matmuls(lm, bf16.kept_weights(loaded)))
    forward = world.wrap(lm, selective)  # before collecting parameters: FSDP replaces them
    trainable = [t for t in peft_model.parameters() if t.requires_grad]
    return Model(peft_model=peft_model, lm=lm, device=loaded.device, forward=forward, trainable=trainable,
                 selective=selective, fused_lora=fused_lora, bf16_layers=bf16_layers)


def setup_optimizer(model: Model, params: wire.TrainParams, device: str, world: World) -> torch.optim.Optimizer:
    # Fused AdamW on CUDA, and on CPU for single-process jobs: one kernel over all LoRA tensors instead
    # of foreach ops (measured on CPU for SmolLM2 r8's 420 tensors: 3.3 ms a step instead of 16.2).
    return torch.optim.AdamW(model.trainable, lr=params.learning_rate, weight_decay=params.weight_decay,
                             fused=device.startswith("cuda") or (device == "cpu" and world.size == 1) or None)


def restore(job: Prepared, model: Model, optimizer: Any, run: RunState, device: str,
            world: World) -> tuple[Optional[EarlyStopper], Optional[dict[str, Any]]]:
    """Early stopping's bookkeeping, and on ``resumeFrom`` the checkpoint's weights, optimizer state,
    totals and position — whichever world wrote it. Returns (early stopper or None, the RNG states
    this rank restores right before the next step, or None)."""
    p, state = job.params, job.resume_state
    stopper = None
    if p.early_stopping is not None:
        stopper = EarlyStopper(p.early_stopping.patience, p.early_stopping.min_delta)
    if state is None:
        return stopper, None
    weights, optimizer_state, saved_rng = checkpoint.read_training(job.resume_path)
    try:
        world.load_training_state(model.peft_model, optimizer, weights, optimizer_state, job.resume_path)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise errors.CheckpointInvalid(f"Checkpoint {job.resume_path} cannot be restored: {exc}",
                                       path=str(job.resume_path)) from exc
    rng_state, notes = world.rng_for_rank(saved_rng, p.dropout)
    job.warnings += notes
    written_by = (state.get("world") or {}).get("processes", 1)
    if written_by != world.size:
        job.warnings.append(f"Resumed on {world.size} process(es); the checkpoint was written by {written_by}: "
                            "the same examples make each step, summed in another order (float rounding).")
    run.restore(state["loop"])
    if stopper is not None and state.get("earlyStopping"):
        stopper = EarlyStopper.from_dict(state["earlyStopping"])
    if state.get("device") != device:
        job.warnings.append(f"Resumed on {device}; the checkpoint was written on {state.get('device')}: "
                            "the result is not bit-identical to an uninterrupted run.")
    run.resumed_from_step = run.step
    return stopper, rng_state
