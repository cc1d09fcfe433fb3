"""What the method handlers may use, in one object: the job queue, the warm model cache, the resident
adapters and their stack, the journal, the distributed supervisor, the drain and the stop flags.

The server builds one ``App`` and passes it to every handler (``fn(app, request, params)``). The
model cache and the supervisor are created on first use, so the process answers ``supports`` before
torch is loaded. No torch at import.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from . import wire
from .adapters.resident import AdapterRegistry
from .adapters.stack import Stack
from .drain import Drain
from .jobs import Job, JobQueue, Report, ShouldStop
from .rpc import JobRunner, Request, path_error

STOP_TIMEOUT = float(os.environ.get("LORA_SIDECAR_STOP_TIMEOUT", 10))
"""Longest wait for a running job to stop (``shutdown``, ``exit``, stdin EOF, SIGTERM)."""


class App:
    def __init__(self, *, notify: Callable[[Job, wire.Progress], None], max_queue: int, max_message_bytes: int,
                 worker_thread: bool = True, claims: Any = None, journal: Any = None,
                 drain: Optional[Drain] = None) -> None:
        self.drain = drain or Drain()  # shutdown {drain: true} and the --drain mode
        self.journal = journal  # sidecar.journal.Journal: train jobs on disk, for status after a restart
        self.claims = claims  # housekeeping.Claims, or None (no crash clean-up)
        self.max_message_bytes = max_message_bytes
        self.shutdown_requested = False
        self.exit_requested = False
        # Resident adapters (the genome): the registry answers adapters/list at once; everything that
        # touches a model (load, unload, compose, generate, export) runs on the job worker, in request order.
        self.adapters = AdapterRegistry()
        self.stack = Stack(self.adapters)
        self.jobs = JobQueue(self.run_job, notify=notify, max_queue=max_queue, own_thread=worker_thread,
                             journal=journal)
        self._models: Any = None
        self._supervisor: Any = None
        self._background: Any = None

    # --- heavy pieces, made on first use ---------------------------------------------------------

    @property
    def models(self) -> Any:
        """The warm model cache (models.ModelCache); evicting a base takes its adapters off the stack."""
        if self._models is None:
            from .models import ModelCache

            self._models = ModelCache()
            self._models.on_evict.append(self.stack.forget)
        return self._models

    @property
    def models_if_made(self) -> Any:
        """The model cache when one exists, else None (nothing is loaded then)."""
        return self._models

    def loaded(self) -> list[str]:
        return self._models.loaded() if self._models is not None else []

    @property
    def supervisor(self) -> Any:
        """Distributed jobs' worker groups (training/distributed.py; imports no torch)."""
        if self._supervisor is None:
            from .training.distributed import Supervisor

            self._supervisor = Supervisor()
        return self._supervisor

    @property
    def background(self) -> Any:
        """The process of ``priority: background`` jobs (training/background.py; imports no torch)."""
        if self._background is None:
            from .training.background import BackgroundProcess

            self._background = BackgroundProcess()
        return self._background

    @property
    def background_if_made(self) -> Any:
        """The background job process's handle when one was made, else None."""
        return self._background

    def close(self) -> None:
        """The worker group of a distributed job and the background job process go with the process."""
        if self._supervisor is not None:
            self._supervisor.close()
        if self._background is not None:
            self._background.close()

    # --- jobs --------------------------------------------------------------------------------------

    def queue(self, request: Request, params: Any, *, base_model: str, job_id: Optional[str] = None,
              progress_interval: float = 0.25, runner: Optional[JobRunner] = None) -> Job:
        """Queue ``params`` as a job of the request's method: its registered kind, run by its registered
        runner (or ``runner``), on the job worker after the jobs ahead of it."""
        m = request.method
        if m is None or m.job is None:
            raise TypeError(f"{m.name if m else 'this request'} is not registered to run on the job queue")
        return self.jobs.submit(m.job, params, runner=runner or m.run, job_id=job_id, base_model=base_model,
                                received_at=request.received_at, request_id=request.request_id,
                                framing=request.framing, progress_interval=progress_interval)

    def run_job(self, job: Job, report: Report, should_stop: ShouldStop) -> Any:
        """Run one job (on the worker) with its runner, an OSError about a path of the job's params
        turned into a PathError naming the field."""
        try:
            return job.runner(self, job, report, should_stop)
        except OSError as exc:
            mapped = path_error(exc, job.params)
            if mapped is None:
                raise
            raise mapped from exc
