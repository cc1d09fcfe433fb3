"""The job queue: one worker thread runs every model-touching job (train, generate, ...) in FIFO order.

One worker means a ``generate`` never sees a model that carries another job's LoRA layers, and the
warm ``ModelCache`` needs no cross-job locking. ``cancel``, ``status`` and ``supports`` never wait
for the worker. Progress from the engine is throttled here and turned into ``progress``
notifications through the ``notify`` callback; the last notification of a job is always written
before its result is released, so none can follow the job's response. With a ``journal``
(sidecar/journal.py) every train job's transitions and checkpoints are also written to disk; a job
stopped by ``stop()`` (shutdown, EOF, signal) ends ``interrupted`` rather than ``cancelled``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from . import errors, wire
from .training.pause import PauseGate

log = logging.getLogger("sidecar.jobs")

FINAL_PHASES = ("completed", "failed", "cancelled", "interrupted")


@dataclass
class Job:
    job_id: str
    kind: str  # "train" | "generate" | "export" | "adapters/load" | ... (status shows it)
    params: Any
    base_model: str
    received_at: float
    request_id: Any = None
    framing: str = "ndjson"
    progress_interval: float = 0.25
    state: str = "queued"
    phase: str = "queued"
    step: int = 0
    total_steps: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    adapter_path: str | None = None
    last_checkpoint: Any = None  # wire.CheckpointRef of the newest checkpoint
    interrupted: bool = False  # stopped by stop(), not by cancel
    cancel_event: threading.Event = field(default_factory=threading.Event)
    gate: PauseGate = field(default_factory=PauseGate)  # the job's should_stop: cancel and pause points
    pause_waiters: list = field(default_factory=list)  # Futures of `pause` requests not answered yet
    paused_by: str | None = None
    phase_before_pause: str = "training"
    priority: str | None = None
    threads: int | None = None
    future: Future = field(default_factory=Future)
    # Throttling state, guarded by JobQueue.lock.
    last_sent_at: float = 0.0
    last_sent_step: int = -1
    last_sent_phase: str | None = None
    closed: bool = False
    runner: Any = None
    """What runs the job; only the queue's ``run`` callable interprets it (see JobQueue)."""

    def info(self) -> wire.JobInfo:
        return wire.JobInfo(
            job_id=self.job_id, kind=self.kind, state=self.state, phase=self.phase, base_model=self.base_model,
            step=self.step, total_steps=self.total_steps, submitted_at=self.received_at,
            started_at=self.started_at, finished_at=self.finished_at, error=self.error,
            adapter_path=self.adapter_path, last_checkpoint=self.last_checkpoint, priority=self.priority,
            threads=self.threads, paused_by=self.paused_by,
        )


Report = Callable[[wire.Progress], None]
ShouldStop = Callable[[], bool]
Run = Callable[[Job, Report, ShouldStop], Any]


class JobQueue:
    """Jobs in FIFO order on one worker. ``run(job, report, should_stop)`` runs any job (the server's
    app passes its own, which calls ``job.runner``); ``notify(job, progress)`` writes a notification."""

    def __init__(
        self,
        run: Run,
        notify: Callable[[Job, wire.Progress], None],
        max_queue: int = 8,
        keep_recent: int = 20,
        own_thread: bool = True,
        journal: Any = None,
    ) -> None:
        self.run = run
        self.journal = journal
        self.notify = notify
        self.max_queue = max_queue
        self.lock = threading.RLock()
        self.wakeup = threading.Condition(self.lock)
        self.queue: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.recent: collections.deque[Job] = collections.deque(maxlen=keep_recent)
        self.by_request: dict[Any, Job] = {}
        self.accepting = True
        self.stopped = False
        self._counter = itertools.count(1)
        # The stdio server runs the worker on the process's main thread instead (own_thread=False,
        # then it calls work()): measured on SmolLM2, training on a secondary thread was ~7 % slower
        # and glibc gave that thread its own malloc arena, raising peak RSS from 2.6 to 4.2 GB.
        self.worker_done = threading.Event()
        self.worker: threading.Thread | None = None
        if own_thread:
            self.worker = threading.Thread(target=self.work, name="sidecar-worker", daemon=True)
            self.worker.start()

    # --- submission -------------------------------------------------------------------------

    def submit(self, kind: str, params: Any, *, runner: Any, job_id: str | None, base_model: str,
               received_at: float, request_id: Any = None, framing: str = "ndjson",
               progress_interval: float = 0.25) -> Job:
        with self.lock:
            if not self.accepting:
                raise errors.ShuttingDown("The sidecar is shutting down and accepts no new jobs")
            if len(self.queue) >= self.max_queue:
                raise errors.QueueFull(
                    f"{len(self.queue)} jobs are already queued (limit {self.max_queue}); retry when one finishes",
                    queued=len(self.queue), limit=self.max_queue)
            if job_id is None:
                job_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            elif (existing := self._find(job_id)) is not None and existing.state in ("queued", "running"):
                raise errors.DuplicateJob(f"Job {job_id!r} is already queued or running", jobId=job_id)
            job = Job(job_id=job_id, kind=kind, params=params, base_model=base_model, received_at=received_at,
                      request_id=request_id, framing=framing, progress_interval=progress_interval,
                      runner=runner, priority=getattr(params, "priority", None),
                      threads=getattr(params, "threads", None))
            self._record(job)
            self.queue.append(job)
            if request_id is not None:
                self.by_request[request_id] = job
            self.wakeup.notify_all()
        if kind == "train":
            ahead = self.position(job)
            self._report(job, wire.Progress(job_id=job.job_id, phase="queued",
                                            message=f"{ahead} job(s) ahead" if ahead else "starting"))
        return job

    def position(self, job: Job) -> int:
        with self.lock:
            ahead = sum(1 for j in self.queue if j is not job and j.received_at <= job.received_at
                        and j.state == "queued")
            return ahead + (1 if self.running is not None else 0)

    # --- cancel / status --------------------------------------------------------------------

    def _find(self, job_id: str) -> Job | None:
        for job in itertools.chain([self.running] if self.running else [], self.queue, self.recent):
            if job.job_id == job_id:
                return job
        return None

    def cancel(self, job_id: str) -> str:
        with self.lock:
            job = self._find(job_id)
            if job is None:
                return "unknown"
            if job is self.running:
                job.cancel_event.set()
                job.gate.cancel()
                return "cancelling"
            if job in self.queue:  # queued, or held there by `pause`
                self.queue.remove(job)
                self._finish_locked(job, "interrupted" if job.interrupted else "cancelled", errors.RequestCancelled(
                    f"Job {job_id} cancelled before it started", jobId=job_id, stepsCompleted=0))
                return "cancelled"
            return job.state

    def cancel_request(self, request_id: Any) -> str | None:
        with self.lock:
            job = self.by_request.get(request_id)
        return self.cancel(job.job_id) if job else None

    def status(self) -> tuple[Job | None, list[Job], list[Job]]:
        with self.lock:
            return self.running, list(self.queue), list(reversed(self.recent))

    def refuse(self) -> None:
        """Accept no new jobs (-32015); the queued and running ones go on (a draining shutdown)."""
        with self.lock:
            self.accepting = False

    def stop(self, timeout: float) -> list[str]:
        """Refuse new jobs, cancel queued and running ones, wait up to ``timeout`` s for the worker."""
        with self.lock:
            self.accepting = False
            ids = [j.job_id for j in self.queue] + ([self.running.job_id] if self.running else [])
            for job in list(self.queue):
                job.interrupted = True
                self.cancel(job.job_id)
            if self.running:
                self.running.interrupted = True
                self.running.cancel_event.set()
                self.running.gate.cancel()
            self.stopped = True
            self.wakeup.notify_all()
        if threading.current_thread() is not self.worker:
            self.worker_done.wait(timeout)
        return ids

    # --- the worker ---------------------------------------------------------------------------

    def work(self) -> None:
        """Run jobs until stop(); on its own thread, or on the caller's (own_thread=False)."""
        try:
            self._work()
        finally:
            self.worker_done.set()

    def _work(self) -> None:
        while True:
            with self.lock:
                # A job held by `pause` stays in the queue; the ones behind it run.
                while (job := next((j for j in self.queue if j.state == "queued"), None)) is None:
                    if self.stopped:
                        return
                    self.wakeup.wait()
                self.queue.remove(job)
                job.state, job.started_at = "running", time.time()
                self.running = job
                job.gate.on_paused = lambda reason, released, ckpt, job=job: self._paused(job, reason, released, ckpt)
                job.gate.on_resumed = lambda job=job: self._resumed(job)
                self._record(job)
            try:
                result = self.run(job, lambda p, job=job: self._report(job, p), job.gate)
            except errors.RequestCancelled as exc:
                self._finish(job, "interrupted" if job.interrupted else "cancelled", exc)
            except errors.SidecarError as exc:
                log.warning("job %s failed: %s", job.job_id, exc.message)
                self._finish(job, "failed", exc)
            except BaseException as exc:  # noqa: BLE001 - a job must never take the process down
                log.error("job %s crashed:\n%s", job.job_id, traceback.format_exc())
                self._finish(job, "failed", errors.InternalError(f"{type(exc).__name__}: {exc}"))
            else:
                if isinstance(result, wire.TrainResult):
                    job.adapter_path = result.adapter_path
                self._finish(job, "completed", None, result)

    def _finish(self, job: Job, state: str, exc: errors.SidecarError | None, result: Any = None) -> None:
        with self.lock:
            self._finish_locked(job, state, exc, result)

    def _finish_locked(self, job: Job, state: str, exc: errors.SidecarError | None, result: Any = None) -> None:
        job.state, job.finished_at = state, time.time()
        if state == "completed":
            job.last_checkpoint = None  # a completed job's checkpoints are deleted with its job directory
        if exc is not None:
            exc.data.setdefault("jobId", job.job_id)
            job.error = exc.message
        for waiter in job.pause_waiters:
            waiter.set_exception(errors.JobNotActive(f"Job {job.job_id} ended ({state}) before it reached a pause "
                                                     "point", jobId=job.job_id, state=state))
        job.pause_waiters.clear()
        job.paused_by = None
        if self.running is job:
            self.running = None
        self.recent.append(job)
        self.by_request.pop(job.request_id, None)
        self._record(job)
        if job.kind == "train":
            final = wire.Progress(job_id=job.job_id, phase=state, step=job.step, total_steps=job.total_steps,
                                  elapsed_seconds=round(job.finished_at - (job.started_at or job.received_at), 3),
                                  message=job.error)
            self._report(job, final)
        job.closed = True
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    # --- progress -----------------------------------------------------------------------------

    def _record(self, job: Job) -> None:
        if self.journal is not None and job.kind == "train":
            self.journal.record(job)

    def _report(self, job: Job, progress: wire.Progress) -> None:
        """Throttle and forward one progress update; never backwards, never after the job closed.
        A checkpoint is journaled and always notified."""
        with self.lock:
            if job.closed:
                return
            now = time.monotonic()
            phase_changed = progress.phase != job.last_sent_phase or progress.checkpoint is not None
            if progress.checkpoint is not None:
                job.last_checkpoint = progress.checkpoint
                job.step = max(job.step, progress.step)
                self._record(job)
            if progress.step < job.last_sent_step:
                return
            if job.phase != progress.phase and job.phase in FINAL_PHASES:
                return
            job.phase = progress.phase
            job.step = max(job.step, progress.step)
            job.total_steps = progress.total_steps or job.total_steps
            if not phase_changed and now - job.last_sent_at < job.progress_interval:
                return
            if job.priority is not None and progress.priority is None:
                progress = msgspec.structs.replace(progress, priority=job.priority, threads=job.threads)
            job.last_sent_at, job.last_sent_step, job.last_sent_phase = now, progress.step, progress.phase
            # Written under the lock so notifications keep their order and the final one precedes
            # the result (the response is written only after the future resolves).
            self.notify(job, progress)

    # --- pause / resume -----------------------------------------------------------------------

    def _active(self, job_id: str) -> Job:
        job = self._find(job_id)
        if job is None:
            raise errors.JobNotFound(f"No job {job_id!r} in this process", jobId=job_id)
        if job.kind != "train" or getattr(job.params, "distributed", None) is not None:
            raise errors.Unsupported(f"Job {job_id} ({job.kind}{', distributed' if job.kind == 'train' else ''}) "
                                     "cannot be paused or resumed: only single-process train jobs can",
                                     jobId=job_id)
        if job.closed or job.state in FINAL_PHASES:
            raise errors.JobNotActive(f"Job {job_id} has ended ({job.state})", jobId=job_id, state=job.state)
        return job

    def pause(self, job_id: str, release: bool = False) -> wire.PauseResult | Future:
        """Hold a queued job in the queue (at once), or park a running one at its next pause point
        (the Future answers then)."""
        with self.lock:
            job = self._active(job_id)
            if job in self.queue:
                if job.state != "paused":
                    job.state, job.paused_by = "paused", "client"
                    self._record(job)
                    self._report(job, wire.Progress(job_id=job_id, phase="paused", paused_by="client",
                                                    message="held in the queue"))
                return wire.PauseResult(job_id=job_id, state="paused", step=job.step)
            job.gate.pause("client", release)
            if job.gate.parked:  # already parked (by yield): the client's reason holds it too
                job.paused_by = "client"
                return wire.PauseResult(job_id=job_id, state="paused", step=job.step)
            waiter: Future = Future()
            job.pause_waiters.append(waiter)
            return waiter

    def resume(self, job_id: str) -> wire.ResumeResult:
        with self.lock:
            job = self._active(job_id)
            if job in self.queue:
                if job.state == "paused":
                    job.state, job.phase, job.paused_by = "queued", "queued", None
                    self._record(job)
                    self._report(job, wire.Progress(job_id=job_id, phase="queued", message="resumed"))
                    self.wakeup.notify_all()
                return wire.ResumeResult(job_id=job_id, state="queued", step=job.step)
            free = job.gate.resume("client")
            if free:  # a pause that had not taken effect yet never will
                for waiter in job.pause_waiters:
                    waiter.set_result(wire.PauseResult(job_id=job_id, state="running", step=job.step))
                job.pause_waiters.clear()
            return wire.ResumeResult(job_id=job_id, state="running" if free else "paused", step=job.step)

    def _paused(self, job: Job, reason: str, released: bool, checkpoint: Any) -> None:
        """The job's thread parked (the gate's on_paused; a background job's runner calls it too)."""
        with self.lock:
            if job.closed:
                return
            if job.phase != "paused":
                job.phase_before_pause = job.phase
            job.state, job.paused_by = "paused", reason
            self._record(job)
            self._report(job, wire.Progress(job_id=job.job_id, phase="paused", step=job.step,
                                            total_steps=job.total_steps, paused_by=reason, checkpoint=checkpoint,
                                            message="the machine is busy" if reason == "busy" else None))
            for waiter in job.pause_waiters:
                waiter.set_result(wire.PauseResult(job_id=job.job_id, state="paused", step=job.step,
                                                   released=released, checkpoint=checkpoint))
            job.pause_waiters.clear()

    def _resumed(self, job: Job) -> None:
        with self.lock:
            if job.closed:
                return
            job.state, job.paused_by = "running", None
            self._record(job)
            self._report(job, wire.Progress(job_id=job.job_id, phase=job.phase_before_pause, step=job.step,
                                            total_steps=job.total_steps, message="resumed"))
