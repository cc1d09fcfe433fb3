"""The training recipe behind ``train``.

``train`` follows a fixed lifecycle (torchtune's recipe shape):

    check params and read the dataset (fail fast, nothing loaded yet)
    → base model from the warm ModelCache (phase ``loading`` only when it really loads)
    → ``preparing``: tokenize and validate with the model's tokenizer
    → attach LoRA (peft) to the cached base model
    → ``training`` (+ ``evaluating`` at each epoch end and at the end when there is validation data)
    → ``saving``: adapter, tokenizer and manifest into ``<target>.tmp-<job>``, renamed into place
    → finally, whatever happened: LoRA layers removed, the base model exactly as it was.

The loop reads top to bottom in nanoGPT's order: lr → micro-batches (forward, backward) → clip →
step → zero_grad → log → stop check. Helpers are defined above it, in the order they are used.
"""

from __future__ import annotations

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
    """Running figures of one job, turned into wire.Progress and the final metrics."""

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

    def send(self, phase: str, message: Optional[str] = None) -> None:
        tps = self.tokens / self.train_seconds if self.train_seconds > 0 else None
        eta = None
        if self.step and self.total_steps:
            eta = round(self.train_seconds / self.step * (self.total_steps - self.step), 2)
        self.report(wire.Progress(
            job_id=self.job_id, phase=phase, step=self.step, total_steps=self.total_steps,
            epoch=round(self.epoch, 4), loss=self.loss, learning_rate=self.lr,
            tokens_per_second=round(tps, 2) if tps is not None else None,
            elapsed_seconds=round(time.monotonic() - self.started, 3), eta_seconds=eta,
            validation_loss=self.validation_loss, message=message))


def train(params: wire.TrainParams, *, job_id: str, models: Any, report: Callable[[wire.Progress], None],
          should_stop: Callable[[], bool], received_at: float,
          world: World = SINGLE_PROCESS) -> Optional[wire.TrainResult]:
    """Train a LoRA adapter on the cached base model and write it atomically (see the module doc).

    ``report`` may be called often (every micro-step); the caller throttles. ``should_stop`` is
    polled before every micro-batch; when it returns True the job raises RequestCancelled
    (``data: {jobId, stepsCompleted}``) after removing the LoRA layers and any temporary output.
    Raises DatasetInvalid, InvalidParams, ModelNotFound, ModelLoadFailed, OutOfMemory,
    TrainingFailed, OutputExists. In every outcome the cached base model is left as it was.

    ``world``: a rank of a worker group (training/world.py) runs the same loop on its share of each
    step; only the main rank writes the adapter and returns the result (the others return None).
    """
    import torch

    started_wall, started = time.time(), time.monotonic()
    prog = _Progress(job_id, report, started)
    apply_thread_setting()

    def cancelled() -> None:
        raise errors.RequestCancelled(f"Job {job_id} cancelled", jobId=job_id, stepsCompleted=prog.step)

    # -- fail fast: params, dataset structure and output target before any model is loaded --------
    if params.target_modules is not None and not params.target_modules:
        raise errors.InvalidParams("targetModules is empty; omit it for the default", field="targetModules")
    loaded_data = data.load_train_and_validation(params)
    target = resolve_output_dir(params, job_id, started_wall)

    # -- model ------------------------------------------------------------------------------------
    loaded = models.get(params.base_model, device=params.device, dtype=params.dtype,
                        quantize_bits=params.quantize_bits if params.quantize else None,
                        trust_remote_code=params.trust_remote_code, on_loading=lambda: prog.send("loading"))
    if should_stop():  # a load can take a while; do not start preparing a cancelled job
        cancelled()
    job_warnings = list(loaded.warnings)
    fingerprint = loaded.fingerprint()  # before anything is attached

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
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    try:
        # -- LoRA ---------------------------------------------------------------------------------
        torch.manual_seed(params.seed)  # LoRA A init and dropout masks
        peft_model = attach_lora(model, params, loaded.resolved.path)
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
        micro_tokens = params.micro_batch_tokens
        if micro_tokens is None:
            micro_tokens = CPU_MICRO_BATCH_TOKENS if device == "cpu" else 0
        forward = world.wrap(lm, selective)  # before collecting parameters: FSDP replaces them
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay,
                                      fused=device.startswith("cuda") or None)
        if should_stop():
            cancelled()

        # -- training -----------------------------------------------------------------------------
        prog.send("training")
        peft_model.train()
        loss_total, label_total, examples_seen = 0.0, 0, 0
        micro_done = 0
        first_step_at: Optional[float] = None
        train_started = time.monotonic()
        for epoch in range(n_epochs):
            batches = data.epoch_batches(lengths, global_batch, seed=params.seed, epoch=epoch,
                                         group_by_length=params.group_by_length)
            for g in range(0, len(batches), params.gradient_accumulation):
                if prog.step >= total_steps:
                    break
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
                micro_done += len(group)
                step_loss, step_tokens, step_examples = world.sum(step_loss, step_tokens, step_examples)
                step_tokens, examples_seen = int(step_tokens), examples_seen + int(step_examples)
                if params.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                if not math.isfinite(step_loss):
                    raise errors.TrainingFailed(
                        f"The loss became {step_loss} at step {prog.step + 1}; lower learningRate",
                        jobId=job_id, stepsCompleted=prog.step)
                prog.step += 1
                prog.train_seconds += time.monotonic() - t_step
                prog.tokens += step_tokens
                prog.epoch = micro_done / micro_per_epoch
                prog.loss, prog.lr = step_loss / step_labels, lr
                loss_total += step_loss
                label_total += step_labels
                if first_step_at is None:
                    first_step_at = time.time()
                prog.history.append({"step": prog.step, "epoch": round(prog.epoch, 4), "loss": prog.loss,
                                     "learningRate": lr, "tokens": step_tokens, "labelTokens": step_labels})
                prog.send("training")

            # Here an epoch ended, or maxSteps did: both are evaluation points, but when maxSteps
            # repeats a tiny dataset many times, evaluate at most about ten times in the run.
            finished = prog.step >= total_steps
            since_eval = prog.step - (prog.validation_history[-1]["step"] if prog.validation_history else 0)
            if val_items and (finished or since_eval >= math.ceil(total_steps / 10)):
                prog.send("evaluating")
                prog.validation_loss = evaluate(lm, val_items, batch_size=params.batch_size, pad_id=pad_id,
                                                device=device, selective=selective, should_stop=should_stop,
                                                on_stop=cancelled)
                prog.validation_history.append({"step": prog.step, "epoch": round(prog.epoch, 4),
                                                "validationLoss": prog.validation_loss})
                if not finished:
                    prog.send("training")
            if finished:
                break
        training_seconds = time.monotonic() - train_started
        if should_stop():
            cancelled()

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
            train_loss=loss_total / max(label_total, 1),
            final_loss=prog.loss if prog.loss is not None else float("nan"),
            validation_loss=prog.validation_loss,
            epochs=round(prog.epoch, 4),
            steps=prog.step,
            training_time=round(training_seconds * 1000),
            examples_processed=examples_seen,
            tokens_per_second=round(prog.tokens / prog.train_seconds, 2) if prog.train_seconds else 0.0,
            trainable_tokens=train_stats.trainable_tokens,
            truncated_examples=train_stats.truncated,
            time_to_first_step_ms=round(((first_step_at or time.time()) - received_at) * 1000),
            load_time_ms=0 if loaded.cached else round(loaded.load_seconds * 1000),
            model_cached=loaded.cached,
            peak_memory_mb=_peak_memory_mb(device),
        )
        finished_wall = time.time()
        manifest = _manifest(
            params=params, job_id=job_id, loaded=loaded, fingerprint=fingerprint, peft_model=peft_model,
            received_at=received_at, started_wall=started_wall, finished_wall=finished_wall,
            train_stats=train_stats, val_stats=val_stats, metrics=metrics, prog=prog, warnings=job_warnings,
            adapter_file=adapter_file, selective=selective, target=target, fused_lora=fused_lora,
            micro_tokens=micro_tokens, world=world,
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _check_target_free(target)
        if target.is_dir():
            target.rmdir()  # an empty directory the caller created for us
        os.rename(tmp, target)
        renamed = True
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
        detach_lora(model, peft_model, before)
        if tmp is not None and not renamed:
            shutil.rmtree(tmp, ignore_errors=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _manifest(*, params: wire.TrainParams, job_id: str, loaded: Any, fingerprint: str, peft_model: Any,
              received_at: float, started_wall: float, finished_wall: float, train_stats: data.DatasetStats,
              val_stats: Optional[data.DatasetStats], metrics: wire.TrainMetrics, prog: _Progress,
              warnings: list[str], adapter_file: Path, selective: bool, target: Path,
              fused_lora: int, micro_tokens: int, world: World) -> dict[str, Any]:
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
        "engine": {"selectiveLogits": selective, "groupByLength": params.group_by_length,
                   "fusedLoraLayers": fused_lora, "microBatchTokens": micro_tokens,
                   "gradientCheckpointing": params.gradient_checkpointing, "distributed": world.describe()},
        "warnings": warnings,
        "adapter": {"path": str(target), "file": ADAPTER_FILE, "sha256": sha256_file(adapter_file),
                    "bytes": adapter_file.stat().st_size},
    }

