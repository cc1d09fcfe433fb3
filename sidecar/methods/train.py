"""``train``: every request check at the door (training/checks.py), then the job — the recipe in this
process or a distributed worker group — and what a job ends with: the exports it asked for and, with
``load``, the new adapter made resident. Also the train defaults ``supports`` reports.

The recipe and the exporter are imported when a job needs them: they import torch.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import errors, wire
from ..app import App
from ..housekeeping import claim_for_output
from ..jobs import Job, Report, ShouldStop
from .memory import guard
from ..rpc import Request, method
from ..training import priority, yielding
from ..training.checks import check_request
from ..training.pause import PauseGate


def train_defaults() -> wire.Defaults:
    """The defaults ``supports`` reports: each field of wire.Defaults read off a bare TrainParams."""
    bare = wire.TrainParams()
    return wire.Defaults(**{f.name: getattr(bare, f.name) for f in msgspec.structs.fields(wire.Defaults)})


def run_train(app: App, job: Job, report: Report,
              should_stop: ShouldStop) -> wire.TrainResult:
    """The job: the memory guard, then train (here, in the background job process, or on the job's
    worker group), then its exports and residency."""
    p: wire.TrainParams = job.params
    # The memory guard, first thing on the worker (before anything loads), not at the door: its
    # estimate tokenizes the dataset (seconds) and the door runs on the thread that reads stdin.
    guard(app, p)
    if job.cancel_event.is_set():  # cancelled (or the sidecar stopping) while it was estimated
        raise errors.RequestCancelled(f"Job {job.job_id} cancelled before it started", jobId=job.job_id,
                                      stepsCompleted=0)
    if p.distributed is not None:
        result = app.supervisor.train(p, job_id=job.job_id, report=report, should_stop=should_stop,
                                      received_at=job.received_at)
    elif p.priority == "background" and isinstance(should_stop, PauseGate):
        # In a process of its own at the lowest priority (training/priority.py says why a process).
        result = app.background.train(p, job_id=job.job_id, report=report, gate=should_stop,
                                      received_at=job.received_at)
    else:
        from ..training import train

        # Training never sees a resident adapter: their layers come off every base (they go back on
        # at their next use), so the job trains on the bare base exactly as on a fresh sidecar.
        app.stack.strip()
        gate = should_stop if isinstance(should_stop, PauseGate) else PauseGate()
        with priority.job_threads(p.threads), yielding.monitor(p.yield_, gate):
            result = train(p, job_id=job.job_id, models=app.models, report=report, should_stop=should_stop,
                           received_at=job.received_at)
    if p.export:
        result = _exports(app, p, result)
    if p.load:
        result = _make_resident(app, p, result)
    return result


@method("train", job="train", run=run_train)
def train(app: App, request: Request, p: wire.TrainParams) -> Any:
    # Every request check, before the job is queued or journaled; the raw params say which fields the
    # client gave (a resume takes those over the stored ones).
    p = check_request(p, raw=request.raw)
    job = app.queue(request, p, base_model=p.base_model, job_id=p.job_id, progress_interval=p.progress_interval)
    if app.claims is not None:  # so that a crash while saving is cleaned up at the next start
        key = app.claims.add(*claim_for_output(p.output_path))
        job.future.add_done_callback(lambda _, key=key: app.claims.release(key))
    return job.future


@method("pause")
def pause(app: App, request: Request, p: wire.PauseParams) -> Any:
    """Held in the queue at once, or parked at the job's next pause point (the answer comes then)."""
    return app.jobs.pause(p.job_id, release=p.release)


@method("resume")
def resume(app: App, request: Request, p: wire.ResumeParams) -> wire.ResumeResult:
    return app.jobs.resume(p.job_id)


def _exports(app: App, p: wire.TrainParams, result: wire.TrainResult) -> wire.TrainResult:
    """The exports a train job ends with; a failed one is a warning (the adapter is written)."""
    from ..adapters.export import export_adapter

    done, notes = [], []
    for i, spec in enumerate(p.export or []):
        try:
            done.append(export_adapter(result.adapter_path, spec.format, output_path=spec.output_path,
                                       out_type=spec.out_type, base_model=p.base_model, models=app.models_if_made,
                                       claims=app.claims))
        except errors.SidecarError as exc:
            notes.append(f"export[{i}] ({spec.format}) was not written: {exc.message} (code {exc.CODE})")
    return msgspec.structs.replace(result, exports=done, warnings=result.warnings + notes)


def _make_resident(app: App, p: wire.TrainParams, result: wire.TrainResult) -> wire.TrainResult:
    """``load: true``: the new adapter becomes resident; a refusal is a warning (the adapter is written)."""
    try:
        outcome = app.adapters.load(result.adapter_path, models=app.models, base_model=p.base_model,
                                    device=p.device, dtype=p.dtype, trust_remote_code=p.trust_remote_code)
    except errors.SidecarError as exc:
        return msgspec.structs.replace(result, warnings=result.warnings + [
            f"The adapter was written but not made resident: {exc.message}"])
    return msgspec.structs.replace(result, adapter_id=outcome.resident.id)
