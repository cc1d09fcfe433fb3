"""Every check of a ``train`` request, in one place, run once at the door — before the job is queued
or journaled — by the server (methods/train.py) and by the entry points that are their own door (a
worker started with ``--job``, ``train --config``). The engine trusts what passed here.

No torch at import: the server answers before torch is loaded.
"""

from __future__ import annotations

from typing import Any, Optional

from .. import data, errors, wire
from . import priority, resume


def check_request(params: wire.TrainParams, raw: Optional[dict[str, Any]] = None) -> wire.TrainParams:
    """Check a decoded ``train`` request and return it prepared: ``resumeFrom`` filled from the job's
    stored params and ``initFrom``'s LoRA shape adopted (training/resume.py), its data sources, the
    LoRA targets, early stopping's validation data, and what a distributed job cannot do.

    ``raw``: the request's params object as sent, when the caller has it: a resume takes the fields
    the request gives over the stored ones, and ``initFrom`` refuses a LoRA field the request gives
    with another value — a field sent with its default value counts as given. Without ``raw``, the
    fields that differ from their defaults count as given (resume.prepare_request).
    Raises InvalidParams, Unsupported, CheckpointNotFound, CheckpointInvalid, ResumeMismatch,
    AdapterNotFound, AdapterMismatch.
    """
    params = resume.prepare_request(raw, params)
    params = check_priority(params)
    data.check_sources(params)
    if params.distributed is not None:
        check_distributed(params, params.distributed.strategy)
        if params.distributed.backend == "nccl" and params.device == "cpu":
            raise errors.InvalidParams("The nccl backend needs device cuda", field="$.distributed.backend")
    if params.target_modules is not None and not params.target_modules:
        raise errors.InvalidParams("targetModules is empty; omit it for the default", field="targetModules")
    if params.early_stopping is not None and not (params.validation_dataset or params.validation_path
                                                  or params.validation_split):
        raise errors.InvalidParams("earlyStopping needs validation data: validationDataset, validationPath or "
                                   "validationSplit", field="earlyStopping")
    return params


def check_priority(p: wire.TrainParams) -> wire.TrainParams:
    """The priority filled in (``LORA_SIDECAR_PRIORITY``, else normal), and what cannot go with it."""
    import msgspec

    default = "normal" if p.distributed is not None else priority.default_priority()
    p = msgspec.structs.replace(p, priority=p.priority or default)
    if p.distributed is not None and (p.priority == "background" or p.yield_ is not None):
        field = "priority" if p.priority == "background" else "yield"
        raise errors.Unsupported(f"{field} is not supported for distributed jobs (their worker processes run at "
                                 "normal priority); run the job without `distributed`", field=f"$.{field}")
    return p


def check_distributed(params: wire.TrainParams, strategy: str) -> None:
    """What a distributed job cannot do, refused before any process starts."""
    if params.device == "mps":
        raise errors.Unsupported("Distributed training runs on cpu or cuda, not mps", field="$.device")
    if strategy == "fsdp" and params.quantize:
        # PEFT's FSDP + QLoRA recipe needs the 4-bit weights packed in a float storage type
        # (bnb_4bit_quant_storage) at load; the model loader does not do that (docs/SCALING.md).
        raise errors.Unsupported("strategy fsdp with quantize is not supported; use strategy ddp with quantize, "
                                 "or fsdp without it", field="$.distributed.strategy")

