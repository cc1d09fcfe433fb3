"""Memory before and around a job: ``estimate`` (a train request's peak, nothing loaded), the memory
guard a ``train`` job runs before it loads anything, the warm models' bytes that ``status`` reports
(the sidecar's and the background job process's), and ``models/unload``. No torch at import."""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import Future
from typing import Any, Optional

from .. import errors, wire
from ..app import App
from ..jobs import Job, Report, ShouldStop
from ..rpc import Request, method
from ..training.checks import check_request

log = logging.getLogger("sidecar.methods")


@method("estimate")
def estimate(app: App, request: Request, p: wire.TrainParams) -> Future:
    """Checked as ``train`` is, on the request's thread; then estimated on a thread of its own (it reads
    the model's config and tokenizes the dataset, 1-4 s, loading no weights: training/estimate.py), so
    the reader goes on to the next message meanwhile. Estimates run one at a time (estimate.py's lock)."""
    p = check_request(p, raw=request.raw)
    done: Future = Future()

    def run() -> None:
        from ..training import estimate as est

        try:
            done.set_result(est.estimate(p, held=held_by_job_process(app, p)))
        except BaseException as exc:  # noqa: BLE001 - answered as the handler's own error would be
            done.set_exception(exc)

    threading.Thread(target=run, name="estimate", daemon=True).start()
    return done


def held_by_job_process(app: App, p: wire.TrainParams) -> Any:
    """What the process the job would run in already holds of its peak: the warm base (same model,
    device, dtype, quantization) and the runtime — the sidecar's for a normal job, the background job
    process's (its cache as it last reported it) for a background one; nothing for a distributed one."""
    from ..training.estimate import Held

    if p.distributed is not None:
        return Held()
    if p.priority == "background":
        background = app.background_if_made
        warm = background.warm() if background is not None else []
        path = _path_or_none(p.base_model)
        return Held(base=max((m.total_bytes for m in warm if m.path == path), default=0),
                    runtime=background is not None and background.pid is not None)
    cache = app.models_if_made
    runtime = "torch" in sys.modules and cache is not None and bool(cache.entries())
    return Held(base=_warm_bytes(cache, p), runtime=runtime)


def _path_or_none(name: str) -> Optional[str]:
    try:
        return _resolved_path(name)
    except errors.SidecarError:
        return None


def _warm_bytes(cache: Any, p: wire.TrainParams) -> int:
    path = _path_or_none(p.base_model)
    if cache is None or path is None:
        return 0
    return max((e.total_bytes() for e in cache.entries() if e.resolved.path == path), default=0)


def guard(app: App, p: wire.TrainParams) -> None:
    """The memory guard of ``train``: refuse a job whose estimate exceeds the memory it can get minus
    ``LORA_SIDECAR_MEMORY_MARGIN_MB`` (MemoryInsufficient, with both numbers and what would fit),
    before anything is loaded. Run by the job itself, first thing on the job worker (methods/train.py),
    never on the thread that reads the protocol: the estimate tokenizes the dataset (seconds), and
    ``cancel``, ``status`` and ``pause`` are answered meanwhile; it then also judges the memory as it is
    when the job starts, after the jobs ahead of it. A job the estimate cannot judge (an unknown
    architecture, a model not on disk, a distributed job) is let through; the reason goes to stderr."""
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
    """The sidecar's warm models (with their residents), then the background job process's."""
    from ..models.cache import warm_model

    cache, background = app.models_if_made, app.background_if_made
    found = []
    if cache is not None:
        residents = app.adapters.residents()
        found = [warm_model(e, [r.id for r in residents if r.base_key == e.key]) for e in cache.entries()]
    return found + (background.warm() if background is not None else [])


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
    """On the worker, in request order (no generate or train of this base runs meanwhile, neither here
    nor in the background job process, whose jobs also run on this worker)."""
    from ..models.cache import warm_model
    from ..training.pause import free_memory

    p: wire.ModelsUnloadParams = job.params
    path = _resolved_path(p.base_model)
    cache, background = app.models_if_made, app.background_if_made
    entries = [e for e in cache.entries() if e.resolved.path == path] if cache is not None else []
    keys = {e.key for e in entries}
    residents = [r for r in app.adapters.residents() if r.base_key in keys]
    needing = _jobs_needing(app, path, own=job)
    if needing or (residents and not p.force):
        raise errors.ModelInUse(_in_use_message(p.base_model, needing, [r.id for r in residents]),
                                baseModel=p.base_model, jobs=needing, residents=[r.id for r in residents])
    unloaded = [warm_model(e, [r.id for r in residents if r.base_key == e.key]) for e in entries]
    freed = 0
    if entries:
        for resident in residents:
            app.adapters.unload(resident.id)
        freed = cache.unload(keys)
        free_memory()  # the C heap's free pages back to the OS, the CUDA allocator's cache emptied
    if background is not None:  # its own cache, in its own process (which frees its memory the same way)
        gone, gone_bytes = background.unload(path)
        unloaded, freed = unloaded + gone, freed + gone_bytes
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
