"""The stdio JSON-RPC server: read loop, dispatch (jsonrpcserver), method handlers, lifecycle.

Every request is dispatched on its own short-lived thread; the read loop waits until the handler
has *accepted* the request (decoded its params and, for ``train``, queued the job) before reading
the next message. So messages take effect in the order they were sent (a ``cancel`` right after a
``train`` finds the job), while a ``train`` can wait for its job without blocking ``supports``,
``status`` or ``cancel``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
from jsonrpcserver import Error, Success
from jsonrpcserver.main import dispatch_to_serializable

from . import PROTOCOL_VERSION, __version__, errors, library_versions, wire
from .jobs import Job, JobQueue
from .stdio import Framing, FrameReader, MessageWriter

log = logging.getLogger("sidecar.server")

STOP_TIMEOUT = float(os.environ.get("LORA_SIDECAR_STOP_TIMEOUT", 10))
MAX_QUEUE = int(os.environ.get("LORA_SIDECAR_MAX_QUEUE", 8))


@dataclass
class RequestContext:
    server: "Server"
    request_id: Any
    framing: Framing
    received_at: float
    accepted: threading.Event = field(default_factory=threading.Event)


def _handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt ``fn(ctx, params_dict)`` to jsonrpcserver: SidecarError → error object, others → -32603."""

    def call(ctx: RequestContext, *args: Any, **kwargs: Any) -> Any:
        try:
            params = list(args) if args else kwargs
            return Success(fn(ctx, params))
        except errors.SidecarError as exc:
            return Error(exc.CODE, exc.message, exc.data or None)
        except Exception as exc:  # noqa: BLE001 - a method never kills the process
            log.exception("internal error in %s", fn.__name__)
            return Error(errors.InternalError.CODE, f"Internal error: {type(exc).__name__}: {exc}", None)
        finally:
            ctx.accepted.set()

    call.__name__ = fn.__name__
    return call


class Server:
    def __init__(self, reader: FrameReader, writer: MessageWriter, worker_thread: bool = True) -> None:
        self.reader = reader
        self.writer = writer
        self._models = None
        self._supervisor = None
        self.shutdown_requested = False
        self.exit_requested = False
        self._stopping = threading.Lock()
        self.jobs = JobQueue({"train": self._run_train, "generate": self._run_generate},
                             notify=self._notify, max_queue=MAX_QUEUE, own_thread=worker_thread)
        self.methods = {
            "supports": _handler(self.supports),
            "train": _handler(self.train),
            "cancel": _handler(self.cancel),
            "status": _handler(self.status),
            "generate": _handler(self.generate),
            "shutdown": _handler(self.shutdown),
            "exit": _handler(self.exit),
            "$/cancelRequest": _handler(self.cancel_request),
        }

    # --- heavy pieces, imported lazily so the process answers `supports` before torch is loaded ---

    @property
    def models(self):
        if self._models is None:
            from .models import ModelCache

            self._models = ModelCache()
        return self._models

    def _run_train(self, job: Job, report, should_stop) -> wire.TrainResult:
        if job.params.distributed is not None:
            return self.supervisor.train(job.params, job_id=job.job_id, report=report, should_stop=should_stop,
                                         received_at=job.received_at)
        from .training import train

        return train(job.params, job_id=job.job_id, models=self.models, report=report,
                            should_stop=should_stop, received_at=job.received_at)

    @property
    def supervisor(self):
        """Distributed jobs' worker groups (training/distributed.py; imports no torch)."""
        if self._supervisor is None:
            from .training.distributed import Supervisor

            self._supervisor = Supervisor()
        return self._supervisor

    def _run_generate(self, job: Job, report, should_stop) -> wire.GenerateResult:
        from .generate import generate

        return generate(job.params, models=self.models)

    def _notify(self, job: Job, progress: wire.Progress) -> None:
        self.writer.write({"jsonrpc": "2.0", "method": "progress", "params": wire.to_builtins(progress)},
                          job.framing)

    # --- methods --------------------------------------------------------------------------------

    def supports(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.SupportsParams)
        from . import models

        defaults = wire.TrainParams()
        fine_tuning, reason = True, None
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            fine_tuning, reason = False, f"training libraries failed to import: {exc}"
        check = None
        if p.base_model is not None:
            check = self._check_model(p.base_model)
        running, queued, _ = self.jobs.status()
        result = wire.SupportsResult(
            protocol_version=PROTOCOL_VERSION,
            sidecar_version=__version__,
            libraries=library_versions(),
            devices=models.device_report(),
            default_device=models.select_device("auto"),
            default_dtype=str(models.select_dtype(models.select_device("auto"), "auto")).replace("torch.", ""),
            supports_fine_tuning=fine_tuning,
            reason=reason,
            quantization=models.quantization_support(),
            methods=sorted(wire.METHODS) + list(wire.NOTIFICATIONS_IN),
            limits=wire.Limits(max_rank=1024, max_queue=self.jobs.max_queue,
                               max_message_bytes=self.reader.max_bytes, max_seq_length=131072),
            defaults=wire.Defaults(base_model=defaults.base_model, rank=defaults.rank, alpha=defaults.alpha,
                                   dropout=defaults.dropout, epochs=defaults.epochs,
                                   learning_rate=defaults.learning_rate, batch_size=defaults.batch_size,
                                   max_seq_length=defaults.max_seq_length, scheduler=defaults.scheduler),
            loaded_models=self._loaded(),
            busy=running is not None,
            queue_length=len(queued),
            model=check,
        )
        return wire.to_builtins(result)

    def _loaded(self) -> list[str]:
        return self._models.loaded() if self._models is not None else []

    def _check_model(self, name: str) -> wire.ModelCheck:
        from . import models

        try:
            resolved = models.resolve_model(name, convert=False)
        except errors.SidecarError as exc:
            return wire.ModelCheck(name=name, resolvable=False, error=exc.message)
        entries = self._models.entries() if self._models is not None else []
        return wire.ModelCheck(name=name, resolvable=True, kind=resolved.description, path=resolved.path,
                               loaded=any(e.resolved.path == resolved.path for e in entries))

    def train(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.TrainParams)
        from .data import check_sources

        check_sources(p)
        job = self.jobs.submit("train", p, job_id=p.job_id, base_model=p.base_model, received_at=ctx.received_at,
                               request_id=ctx.request_id, framing=ctx.framing,
                               progress_interval=p.progress_interval)
        ctx.accepted.set()
        return wire.to_builtins(job.future.result())

    def generate(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.GenerateParams)
        job = self.jobs.submit("generate", p, job_id=None, base_model=p.base_model, received_at=ctx.received_at,
                               request_id=ctx.request_id, framing=ctx.framing)
        ctx.accepted.set()
        return wire.to_builtins(job.future.result())

    def cancel(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.CancelParams)
        return wire.to_builtins(wire.CancelResult(job_id=p.job_id, state=self.jobs.cancel(p.job_id)))

    def cancel_request(self, ctx: RequestContext, params: Any) -> Any:
        if isinstance(params, dict) and "id" in params:
            self.jobs.cancel_request(params["id"])
        return None

    def status(self, ctx: RequestContext, params: Any) -> Any:
        wire.decode_params(params, wire.StatusParams)
        running, queued, recent = self.jobs.status()
        return wire.to_builtins(wire.StatusResult(
            running=running.info() if running else None, queued=[j.info() for j in queued],
            recent=[j.info() for j in recent], loaded_models=self._loaded()))

    def shutdown(self, ctx: RequestContext, params: Any) -> Any:
        wire.decode_params(params, wire.ShutdownParams)
        self.shutdown_requested = True
        cancelled = self.jobs.stop(STOP_TIMEOUT)
        if self._models is not None:
            self._models.evict_all()
        return wire.to_builtins(wire.ShutdownResult(ok=True, cancelled_jobs=cancelled))

    def exit(self, ctx: RequestContext, params: Any) -> Any:
        self.exit_requested = True
        return None

    # --- the read loop ------------------------------------------------------------------------

    def serve(self) -> int:
        while not self.exit_requested:
            frame = self.reader.read()
            if frame is None:
                log.info("stdin closed; stopping")
                break
            received_at = time.time()
            if frame.error is not None:
                self._send_error(None, errors.InvalidRequest(frame.error), frame.framing)
                continue
            self._handle(frame.body, frame.framing, received_at)
        return self.stop(0 if self.shutdown_requested or not self.exit_requested else 1)

    def _handle(self, body: bytes, framing: Framing, received_at: float) -> None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._send_error(None, errors.ParseError(f"Parse error: invalid UTF-8 at byte {exc.start}",
                                                     position=exc.start), framing)
            return
        try:
            request = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            self._send_error(None, errors.ParseError(f"Parse error: {exc}"), framing)
            return
        if isinstance(request, list) and not request:
            self._send_error(None, errors.InvalidRequest("Invalid Request: empty batch"), framing)
            return
        request_id = request.get("id") if isinstance(request, dict) else None
        ctx = RequestContext(self, request_id, framing, received_at)

        def run() -> None:
            try:
                response = dispatch_to_serializable(text, self.methods, context=ctx,
                                                    deserializer=lambda _: request)
                if response is not None:
                    self.writer.write(response, framing)
            except Exception:  # noqa: BLE001
                log.exception("dispatch failed")
                self._send_error(request_id, errors.InternalError(), framing)
            finally:
                ctx.accepted.set()

        threading.Thread(target=run, name=f"request-{request_id}", daemon=True).start()
        ctx.accepted.wait()

    def _send_error(self, request_id: Any, exc: errors.SidecarError, framing: Framing) -> None:
        self.writer.write({"jsonrpc": "2.0", "error": exc.to_error(), "id": request_id}, framing)

    def stop(self, code: int) -> int:
        """Cancel jobs (a running one stops within a step), release models, flush; return the exit code."""
        with self._stopping:
            self.jobs.stop(STOP_TIMEOUT)
            if self._supervisor is not None:
                self._supervisor.close()
            # Let handler threads write the responses of the jobs that just ended.
            time.sleep(0.05)
        return code


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies, so the sidecar never outlives it."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def serve_stdio() -> int:
    from .stdio import protect_stdout

    out = protect_stdout()
    logging.basicConfig(level=os.environ.get("LORA_SIDECAR_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    _die_with_parent()
    # Jobs run on the main thread (see JobQueue); the protocol is read on a secondary one.
    server = Server(FrameReader(sys.stdin.buffer), MessageWriter(out), worker_thread=False)

    def finish(code: int) -> None:
        out.flush()
        # Handler threads are daemons, and torch may hold non-daemon threads: exit now.
        os._exit(code)

    def on_signal(signum, frame) -> None:
        log.info("signal %d; stopping", signum)
        threading.Thread(target=lambda: finish(server.stop(0)), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("lora-sidecar %s ready (protocol %s, pid %d)", __version__, PROTOCOL_VERSION, os.getpid())
    threading.Thread(target=lambda: finish(server.serve()), name="stdin-reader", daemon=True).start()
    server.jobs.work()
    while True:  # the reader thread ends the process; the main thread stays to receive signals
        time.sleep(3600)
