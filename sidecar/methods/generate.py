"""``generate``: the request's checks at the door (generate.check_params), then the job on the worker.

An ``adapterPath`` that a queued or running ``train`` job will write is the one check that cannot run
at the door: it runs when the job starts instead (after the train job, one worker, FIFO), so
``train`` then ``generate`` with the new adapter works in one script without waiting in between.
"""

from __future__ import annotations

import os
from typing import Any

from .. import errors, wire
from ..app import App
from ..generate import check_params
from ..jobs import Job, JobQueue, Report, ShouldStop
from ..rpc import Request, method


def run_generate(app: App, job: Job, report: Report,
                 should_stop: ShouldStop) -> wire.GenerateResult:
    from ..generate import generate

    return generate(job.params, models=app.models, registry=app.adapters, stack=app.stack, should_stop=should_stop)


def run_generate_checked(app: App, job: Job, report: Report,
                         should_stop: ShouldStop) -> wire.GenerateResult:
    """A generate whose adapter a train job ahead of it writes: checked now that that job has run."""
    check_params(job.params)
    return run_generate(app, job, report, should_stop)


@method("generate", job="generate", run=run_generate)
def generate(app: App, request: Request, p: wire.GenerateParams) -> Any:
    runner = run_generate
    try:
        check_params(p)
    except errors.AdapterNotFound:
        # Not written yet by a train job ahead of this one? Then it is checked when it runs.
        if p.adapter_path is None or not written_by_earlier_train(app.jobs, p.adapter_path):
            raise
        runner = run_generate_checked
    return app.queue(request, p, base_model=p.base_model, runner=runner).future


def written_by_earlier_train(jobs: JobQueue, path: str) -> bool:
    """Whether a queued or running ``train`` job of ``jobs`` writes its adapter to ``path``."""

    def norm(value: str) -> str:
        return os.path.abspath(os.path.expanduser(value))

    running, queued, _ = jobs.status()
    target = norm(path)
    return any(job.kind == "train" and getattr(job.params, "output_path", None)
               and norm(job.params.output_path) == target
               for job in ([running] if running else []) + queued)
