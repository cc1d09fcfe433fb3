"""The process's own methods: ``supports``, ``status``, ``cancel``, ``$/cancelRequest``, ``shutdown``
and ``exit``. None of them waits for the job worker."""

from __future__ import annotations

import logging
from typing import Any

from .. import PROTOCOL_VERSION, __version__, errors, library_versions, wire
from ..app import STOP_TIMEOUT, App
from ..rpc import MAX_NESTING_DEPTH, Request, method
from .memory import warm_models
from .train import train_defaults

log = logging.getLogger("sidecar.methods")


@method("supports")
def supports(app: App, request: Request, p: wire.SupportsParams) -> wire.SupportsResult:
    from .. import models

    fine_tuning, reason = True, None
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        fine_tuning, reason = False, f"training libraries failed to import: {exc}"
    check = _check_model(app, p.base_model) if p.base_model is not None else None
    running, queued, _ = app.jobs.status()
    device = models.select_device("auto")
    return wire.SupportsResult(
        protocol_version=PROTOCOL_VERSION,
        sidecar_version=__version__,
        libraries=library_versions(),
        devices=[wire.DeviceInfo(type=d.type, name=d.name, memory_bytes=d.memory_bytes, bf16=d.bf16)
                 for d in models.device_report()],
        default_device=device,
        default_dtype=_dtype_name(models.select_dtype(device, "auto")),
        supports_fine_tuning=fine_tuning,
        reason=reason,
        quantization=_quantization(models.quantization_support()),
        methods=sorted(wire.METHODS) + list(wire.NOTIFICATIONS_IN),
        limits=wire.Limits(max_rank=1024, max_queue=app.jobs.max_queue, max_message_bytes=app.max_message_bytes,
                           max_seq_length=131072, max_nesting_depth=MAX_NESTING_DEPTH,
                           adapter_budget_bytes=app.adapters.budget_bytes),
        defaults=train_defaults(),
        loaded_models=app.loaded(),
        busy=running is not None,
        queue_length=len(queued),
        model=check,
        export_architectures=_export_architectures(),
        default_target_modules=_default_targets(),
    )


def _export_architectures() -> list[str]:
    from ..adapters.gguf_arch import EXPORTABLE  # no torch, no gguf: a table

    return list(EXPORTABLE)


def _default_targets() -> dict[str, list[str]]:
    from ..training.targets import table  # no torch: a table

    return table()


def _dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` → ``bfloat16``."""
    return str(dtype).replace("torch.", "")


def _quantization(q: Any) -> wire.Quantization:
    return wire.Quantization(four_bit=q.four_bit, eight_bit=q.eight_bit, reason=q.reason)


def _check_model(app: App, name: str) -> wire.ModelCheck:
    from .. import models

    try:
        resolved = models.resolve_model(name, convert=False)
    except errors.SidecarError as exc:
        return wire.ModelCheck(name=name, resolvable=False, error=exc.message)
    entries = app.models_if_made.entries() if app.models_if_made is not None else []
    return wire.ModelCheck(name=name, resolvable=True, kind=resolved.description, path=resolved.path,
                           loaded=any(e.resolved.path == resolved.path for e in entries))


@method("status")
def status(app: App, request: Request, p: wire.StatusParams) -> wire.StatusResult:
    running, queued, recent = app.jobs.status()
    infos = [j.info() for j in recent]
    if app.journal is not None:  # with the jobs of earlier processes, interrupted ones included
        infos = app.journal.recent(infos)
    return wire.StatusResult(running=running.info() if running else None, queued=[j.info() for j in queued],
                             recent=infos, loaded_models=app.loaded(), adapters=app.adapters.summary(),
                             models=warm_models(app))


@method("cancel")
def cancel(app: App, request: Request, p: wire.CancelParams) -> wire.CancelResult:
    state = app.jobs.cancel(p.job_id)
    if state == "unknown" and app.journal is not None:  # a job of an earlier process
        state = app.journal.cancel(p.job_id) or state
    return wire.CancelResult(job_id=p.job_id, state=state)


@method("$/cancelRequest")
def cancel_request(app: App, request: Request, p: wire.CancelRequestParams) -> None:
    app.jobs.cancel_request(p.id)


@method("shutdown")
def shutdown(app: App, request: Request, p: wire.ShutdownParams) -> wire.ShutdownResult:
    app.shutdown_requested = True
    if app.drain.wanted(p.drain):
        # New jobs are refused from now on, but the read loop goes on (cancel and status still
        # answer) while the jobs received before this request run to their end.
        app.jobs.refuse()
        request.accepted.set()
        log.info("shutdown: finishing %d earlier request(s) first", app.drain.pending() - 1)
        app.drain.shutdown(request.ticket)
    cancelled = app.jobs.stop(STOP_TIMEOUT)
    if app.models_if_made is not None:
        app.models_if_made.evict_all()
    return wire.ShutdownResult(ok=True, cancelled_jobs=cancelled)


@method("exit", decode=False)
def exit_(app: App, request: Request, params: Any) -> None:
    """Any params are ignored: ``exit`` always ends the read loop."""
    app.exit_requested = True
