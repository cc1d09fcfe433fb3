"""Memory before and around a job: ``estimate`` (a train request's peak, nothing loaded), the memory
guard ``train`` runs at its door, the warm models' bytes that ``status`` reports, and
``models/unload``. No torch at import."""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from .. import errors, wire
from ..app import App
from ..jobs import Job, Report, ShouldStop
from ..rpc import Request, method
from ..training.checks import check_request

log = logging.getLogger("sidecar.methods")


@method("estimate")
def estimate(app: App, request: Request, p: wire.TrainParams) -> wire.EstimateResult:
    """Answered at once, on the request's thread: reads the model's config and tokenizes the dataset,
    loads no weights (training/estimate.py)."""
    from ..training import estimate as est

    p = check_request(p, raw=request.raw)
    return est.estimate(p, held=held_by_job_process(app, p))


def held_by_job_process(app: App, p: wire.TrainParams) -> Any:
    """What the process the job would run in already holds of its peak: the warm base (same model,
    device, dtype, quantization) and the runtime, when that process is the sidecar itself (a normal
    job); nothing for a background job (a process of its own) or a distributed one."""
    from ..training.estimate import Held

    if p.priority == "background" or p.distributed is not None:
        return Held()
    cache = app.models_if_made
    runtime = "torch" in sys.modules and cache is not None and bool(cache.entries())
    return Held(base=_warm_bytes(cache, p), runtime=runtime)


def _warm_bytes(cache: Any, p: wire.TrainParams) -> int:
    if cache is None:
        return 0
    from ..models import resolve_model

    try:
        path = resolve_model(p.base_model, convert=False).path
    except errors.SidecarError:
        return 0
    return max((e.total_bytes() for e in cache.entries() if e.resolved.path == path), default=0)


def guard(app: App, p: wire.TrainParams) -> None:
    """The memory guard of ``train``: refuse a job whose estimate exceeds the memory it can get minus
    ``LORA_SIDECAR_MEMORY_MARGIN_MB`` (MemoryInsufficient, with both numbers and what would fit),
    before anything is queued or loaded. A job the estimate cannot judge (an unknown architecture, a
    model not on disk, a distributed job) is let through; the reason goes to stderr."""
    from ..training import estimate as est

    if not est.guard_enabled() or p.distributed is not None:
        return
    try:
        result = est.estimate(p, held=held_by_job_process(app, p), suggest=True)
    except errors.SidecarError as exc:  # the job itself reports these (dataset, model) as before
        log.info("memory guard: no estimate (%s); the job goes on", exc.message)
        return
    except Exception as exc:  # noqa: BLE001 — the guard never fails a job by its own fault
        log.warning("memory guard: the estimate failed (%s: %s); the job goes on", type(exc).__name__, exc)
        return
    if not result.fits:
        raise est.refusal(result)


# ---------------------------------------------------------------------------------------------
# status: the warm models' bytes; models/unload
# ---------------------------------------------------------------------------------------------

def warm_models(app: App) -> list[wire.WarmModel]:
    cache = app.models_if_made
    if cache is None:
        return []
    residents = app.adapters.residents()
    return [_warm_model(entry, [r.id for r in residents if r.base_key == entry.key]) for entry in cache.entries()]


def _warm_model(entry: Any, residents: list[str]) -> wire.WarmModel:
    derived = entry.total_bytes() - entry.nbytes
    return wire.WarmModel(name=entry.name, path=entry.resolved.path, device=entry.device,
                          dtype=str(entry.dtype).replace("torch.", ""), quantize_bits=entry.key.quantize_bits,
                          weights_bytes=entry.nbytes, bf16_copy_bytes=derived, total_bytes=entry.total_bytes(),
                          residents=residents)


def _resolved_path(name: str) -> str:
    from ..models import resolve_model

    return resolve_model(name, convert=False).path


def _jobs_needing(app: App, path: str, own: Optional[Job] = None) -> list[str]:
    """Ids of the running and queued jobs (this one aside) whose base model is ``path``."""
    running, queued, _ = app.jobs.status()
    found = []
    for job in ([running] if running is not None else []) + list(queued):
        if job is own or job.kind == "models/unload" or not job.base_model:
            continue
        try:
            if _resolved_path(job.base_model) == path:
                found.append(job.job_id)
        except errors.SidecarError:
            continue
    return found


def run_unload(app: App, job: Job, report: Report, should_stop: ShouldStop) -> wire.ModelsUnloadResult:
    """On the worker, in request order (no generate or train of this base runs meanwhile)."""
    p: wire.ModelsUnloadParams = job.params
    path = _resolved_path(p.base_model)
    cache = app.models_if_made
    entries = [e for e in cache.entries() if e.resolved.path == path] if cache is not None else []
    if not entries:
        return wire.ModelsUnloadResult(base_model=p.base_model)
    keys = {e.key for e in entries}
    residents = [r for r in app.adapters.residents() if r.base_key in keys]
    needing = _jobs_needing(app, path, own=job)
    if needing or (residents and not p.force):
        raise errors.ModelInUse(_in_use_message(p.base_model, needing, [r.id for r in residents]),
                                baseModel=p.base_model, jobs=needing, residents=[r.id for r in residents])
    unloaded = [_warm_model(e, [r.id for r in residents if r.base_key == e.key]) for e in entries]
    for resident in residents:
        app.adapters.unload(resident.id)
    freed = cache.unload(keys)
    from ..training.pause import free_memory

    free_memory()  # the C heap's free pages back to the OS, the CUDA allocator's cache emptied
    return wire.ModelsUnloadResult(base_model=p.base_model, unloaded=unloaded, bytes_freed=freed,
                                   residents_unloaded=[r.id for r in residents])


def _in_use_message(name: str, jobs: list[str], residents: list[str]) -> str:
    why = []
    if jobs:
        why.append(f"job(s) {', '.join(jobs)} need it (cancel them or wait)")
    if residents:
        why.append(f"resident adapter(s) {', '.join(residents)} are loaded on it (unload them, or pass force: "
                   "true to unload them with it)")
    return f"Base model {name!r} is in use: " + "; ".join(why)


@method("models/unload", job="models/unload", run=run_unload)
def models_unload(app: App, request: Request, p: wire.ModelsUnloadParams) -> Any:
    path = _resolved_path(p.base_model)  # ModelNotFound at once for a name that does not resolve
    needing = _jobs_needing(app, path)
    if needing:  # refused at the door too: the jobs ahead of the unload would load it again
        raise errors.ModelInUse(_in_use_message(p.base_model, needing, []), baseModel=p.base_model,
                                jobs=needing, residents=[])
    return app.queue(request, p, base_model=p.base_model).future
