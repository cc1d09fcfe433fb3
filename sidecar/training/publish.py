"""Where a job's adapter goes and how it gets there: the output target, the final metrics, the
training manifest and the application's package files, and the write into ``<target>.tmp-<job>``
renamed into place.

``temp_dir`` is the one place that names the temporary directory: the recipe writes into it, and the
supervisor of a distributed job removes it when it stops a group mid-save. No torch here (the
supervisor imports this module).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import msgspec

from .. import PROTOCOL_VERSION, __version__, errors, library_versions, paths, procs, wire
from ..adapters import package
from ..files import ADAPTER_FILE, MANIFEST_FILE, safe_name, sha256_file, utc_iso
from . import checkpoint, tensorboard
from .state import Base, Model, Prepared, RunState, TrainData

if TYPE_CHECKING:
    from .checkpointer import Checkpointer
    from .world import World


# ---------------------------------------------------------------------------------------------
# The output target
# ---------------------------------------------------------------------------------------------

def resolve_output_dir(params: wire.TrainParams, job_id: str, now: float) -> Path:
    """``outputPath``, or ``<adapters dir>/<personaName>-<traitType>-<UTC timestamp>`` when both persona
    fields are given, else ``<adapters dir>/<name>-<UTC timestamp>``. An existing non-empty target
    raises OutputExists (checked again just before the final rename)."""
    if params.output_path:
        target = Path(params.output_path).expanduser().absolute()
    else:
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        stem = (f"{params.persona_name}-{params.trait_type}" if params.persona_name and params.trait_type
                else params.name or "adapter")
        target = paths.adapters_dir().absolute() / f"{safe_name(stem)}-{stamp}"
        if target.exists():  # two jobs within one second: keep both
            target = target.with_name(f"{target.name}-{safe_name(job_id)}")
    check_target_free(target)
    return target


def check_target_free(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise errors.OutputExists(f"Output path {target} already exists and is not empty; choose another "
                                  "outputPath or remove it", path=str(target))


def temp_dir(target: Path, job_id: str) -> Path:
    """``<target>.tmp-<job>``: where the adapter is written before the rename that publishes it."""
    return target.with_name(f"{target.name}.tmp-{safe_name(job_id)}")


# ---------------------------------------------------------------------------------------------
# Write and rename
# ---------------------------------------------------------------------------------------------

def write_adapter(*, job: Prepared, base: Base, data: TrainData, model: Model, run: RunState,
                  ckpt: Checkpointer, world: World, adapter_state: Optional[dict[str, Any]],
                  received_at: float, started_wall: float, training_seconds: float) -> wire.TrainResult:
    """Write the adapter, its tokenizer, the manifest and the application's package files
    (adapters/package.py) into the temporary directory and rename it to the target (removing the temporary directory on any failure); then the job's checkpoints go."""
    target = job.target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target, job.job_id)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.peft_model.save_pretrained(str(tmp), safe_serialization=True, state_dict=adapter_state)
        base.loaded.tokenizer.save_pretrained(str(tmp))
        adapter_file = tmp / ADAPTER_FILE
        if not adapter_file.is_file():
            raise errors.TrainingFailed(f"peft did not write {ADAPTER_FILE}", path=str(tmp))
        events = _write_events(job, run, tmp)  # before the package files: sizeMB counts them
        metrics = final_metrics(job=job, base=base, data=data, run=run, ckpt=ckpt, received_at=received_at,
                                training_seconds=training_seconds)
        doc = manifest(job=job, base=base, data=data, model=model, run=run, world=world, metrics=metrics,
                       received_at=received_at, started_wall=started_wall, finished_wall=time.time(),
                       adapter_file=adapter_file)
        doc.update(continuity(job=job, base=base, run=run, ckpt=ckpt))
        doc["tensorboard"] = str(events.relative_to(tmp)) if events is not None else None
        (tmp / MANIFEST_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        package.write_package(tmp, package_info(job=job, base=base, run=run, metrics=metrics,
                                                training_seconds=training_seconds))
        check_target_free(target)
        if target.is_dir():
            target.rmdir()  # an empty directory the caller created for us
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The adapter is the result now: its checkpoints go. params.json stays until the journal has
    # recorded the completion (it then removes the directory), so a crash in between is still
    # recognised as completed at the next start (it names the output path).
    checkpoint.clear(job.job_dir)
    run.send("saving", message=f"Adapter written to {target}")
    return wire.TrainResult(job_id=job.job_id, adapter_path=str(target), manifest_path=str(target / MANIFEST_FILE),
                            metrics=metrics, warnings=job.warnings)


def _write_events(job: Prepared, run: RunState, tmp: Path) -> Optional[Path]:
    """``tensorboard: true``: the run's TensorBoard events into ``tmp/runs/<job>/`` (training/tensorboard.py);
    a job whose events cannot be written completes with a warning instead."""
    if not job.params.tensorboard:
        return None
    events, warning = tensorboard.write_events(tmp, job.job_id, run.history, run.validation_history, run.figures)
    if warning is not None:
        job.warnings.append(warning)
    return events


# ---------------------------------------------------------------------------------------------
# What the result and the manifest say
# ---------------------------------------------------------------------------------------------

def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return procs.peak_rss_mb() or 0.0


def final_metrics(*, job: Prepared, base: Base, data: TrainData, run: RunState, ckpt: Checkpointer,
                  received_at: float, training_seconds: float) -> wire.TrainMetrics:
    stopper, loaded = ckpt.stopper, base.loaded
    return wire.TrainMetrics(
        train_loss=run.loss_total / max(run.label_total, 1),
        final_loss=run.loss if run.loss is not None else float("nan"),
        validation_loss=stopper.best_loss if stopper is not None else run.validation_loss,
        epochs=round(run.epoch, 4),
        steps=run.step,
        training_time=round(training_seconds * 1000),
        examples_processed=run.examples_seen,
        tokens_per_second=round(run.tokens / run.train_seconds, 2) if run.train_seconds else 0.0,
        trainable_tokens=data.stats.trainable_tokens,
        truncated_examples=data.stats.truncated,
        time_to_first_step_ms=round(((run.first_step_at or time.time()) - received_at) * 1000),
        load_time_ms=0 if loaded.cached else round(loaded.load_seconds * 1000),
        model_cached=loaded.cached,
        peak_memory_mb=peak_memory_mb(loaded.device),
        resumed_from_step=run.resumed_from_step,
        best_step=stopper.best_step if stopper is not None else None,
        stopped_early=ckpt.stopped_early,
    )


def package_info(*, job: Prepared, base: Base, run: RunState, metrics: wire.TrainMetrics,
                 training_seconds: float) -> package.PackageInfo:
    """What the application's package files (adapters/package.py) say about this job's adapter. An
    ``initFrom`` job is ``refined`` and takes the persona fields it lacks from the parent's manifest.json."""
    p, loaded = job.params, base.loaded
    persona = {"personaId": p.persona_id, "personaName": p.persona_name, "traitType": p.trait_type}
    if p.init_from and None in persona.values():
        inherited = package.inherited_persona([p.init_from])
        persona = {k: v if v is not None else inherited[k] for k, v in persona.items()}
    quantization = None
    if p.quantize:
        quantization = package.quantization_info(requested_bits=p.quantize_bits, loaded_bits=loaded.key.quantize_bits,
                                                 compute_dtype=str(loaded.dtype).removeprefix("torch."))
    return package.PackageInfo(
        source="refined" if p.init_from else "trained", base_model=p.base_model, rank=p.rank,
        persona_id=persona["personaId"], persona_name=persona["personaName"], trait_type=persona["traitType"],
        fallback_name=p.name or job.target.name, epochs=metrics.epochs, final_loss=metrics.final_loss,
        training_ms=metrics.training_time, train_runtime_s=training_seconds,
        loss_history=[h["loss"] for h in run.history], examples_processed=metrics.examples_processed,
        dataset_hash=f"sha256:{job.train_sha256}", quantization=quantization, created_at=time.time())


def continuity(*, job: Prepared, base: Base, run: RunState, ckpt: Checkpointer) -> dict[str, Any]:
    """The manifest's record of where the run came from and why it stopped."""
    stopper, cadence = ckpt.stopper, ckpt.cadence
    resumed = None
    if job.resume_path:
        resumed = {"checkpoint": str(job.resume_path), "step": run.resumed_from_step}
    return {
        "resumedFrom": resumed,
        "parent": base.parent_record,
        "earlyStopping": stopper.report() if stopper is not None else None,
        "stopReason": "earlyStopping" if ckpt.stopped_early else ("maxSteps" if job.params.max_steps else "epochs"),
        "checkpointing": {"every": cadence.every, "seconds": cadence.seconds, "keep": cadence.keep,
                          "written": run.checkpoints, "secondsSpent": round(run.checkpoint_seconds, 3)},
    }


def manifest(*, job: Prepared, base: Base, data: TrainData, model: Model, run: RunState, world: World,
             metrics: wire.TrainMetrics, received_at: float, started_wall: float, finished_wall: float,
             adapter_file: Path) -> dict[str, Any]:
    """``training_manifest.json`` (without its continuity part): everything needed to tell how the
    adapter was made."""
    params, loaded = job.params, base.loaded
    lora = model.peft_model.peft_config["default"]
    hyper = msgspec.to_builtins(msgspec.structs.replace(params, dataset=None, validation_dataset=None))
    dataset = {"source": params.dataset_path or "inline", **data.stats.to_dict()}
    validation = None
    if data.validation_stats is not None:
        source = params.validation_path or ("inline" if params.validation_dataset else "validationSplit")
        validation = {"source": source, **data.validation_stats.to_dict()}
    return {
        "format": "lora-sidecar.training-manifest/1",
        "jobId": job.job_id,
        "receivedAt": utc_iso(received_at),
        "startedAt": utc_iso(started_wall),
        "finishedAt": utc_iso(finished_wall),
        "sidecar": {"version": __version__, "protocolVersion": PROTOCOL_VERSION},
        "libraries": library_versions(),
        "baseModel": {
            "name": params.base_model, "kind": loaded.resolved.kind, "path": loaded.resolved.path,
            "ggufFile": loaded.resolved.gguf_file, "fingerprint": base.fingerprint, "device": loaded.device,
            "dtype": str(loaded.dtype).removeprefix("torch."), "quantizeBits": loaded.key.quantize_bits,
        },
        "persona": {"personaId": params.persona_id, "personaName": params.persona_name,
                    "traitType": params.trait_type, "name": params.name},
        "hyperparameters": hyper,
        "lora": {"r": lora.r, "loraAlpha": lora.lora_alpha, "targetModules": sorted(lora.target_modules),
                 "dropout": lora.lora_dropout, "useRslora": lora.use_rslora, "useDora": lora.use_dora},
        "dataset": dataset,
        "validation": validation,
        "metrics": msgspec.to_builtins(metrics),
        "lossHistory": run.history,
        "validationHistory": run.validation_history,
        "engine": {"selectiveLogits": model.selective, "groupByLength": data.grouped,
                   "fusedLoraLayers": model.fused_lora, "bf16MatmulLayers": model.bf16_layers,
                   "microBatchTokens": data.micro_tokens, "gradientCheckpointing": params.gradient_checkpointing,
                   "distributed": world.describe()},
        "warnings": job.warnings,
        "adapter": {"path": str(job.target), "file": ADAPTER_FILE, "sha256": sha256_file(adapter_file),
                    "bytes": adapter_file.stat().st_size},
    }
