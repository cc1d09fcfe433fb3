"""The stdio JSON-RPC server: read loop, dispatch (jsonrpcserver), method handlers, lifecycle.

Every request is dispatched on its own short-lived thread; the read loop waits until the handler
has *accepted* the request (decoded its params and, for ``train``, queued the job) before reading
the next message. So messages take effect in the order they were sent (a ``cancel`` right after a
``train`` finds the job), while a ``train`` can wait for its job without blocking ``supports``,
``status`` or ``cancel``.

Nothing a client sends can stop the read loop: each message is decoded, checked (envelope, nesting
depth) and dispatched on its own, element by element for a batch, and any failure is answered and
logged. The process ends on ``exit``, stdin EOF, SIGTERM/SIGINT or its parent's death, within a
bounded time whatever the running job does (see ``stop``).
"""

from __future__ import annotations

import errno as errno_names
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import msgspec
from jsonrpcserver import Error, Success
from jsonrpcserver.main import dispatch_to_serializable

from . import PROTOCOL_VERSION, __version__, errors, library_versions, wire
from .adapters.resident import AdapterRegistry
from .adapters.stack import Stack
from .drain import Drain, written_by_earlier_train
from .jobs import Job, JobQueue
from .stdio import Framing, FrameReader, MessageWriter

log = logging.getLogger("sidecar.server")

STOP_TIMEOUT = float(os.environ.get("LORA_SIDECAR_STOP_TIMEOUT", 10))
"""Longest wait for a running job to stop (``shutdown``, ``exit``, stdin EOF, SIGTERM)."""
ORPHAN_GRACE = 0.5
"""Once the parent is gone nobody reads the answers: a job gets this long to stop, then the
process exits anyway (a half-written adapter is only ever a temporary directory, removed at the
next start-up; see housekeeping.py)."""
MAX_QUEUE = int(os.environ.get("LORA_SIDECAR_MAX_QUEUE", 8))
MAX_NESTING_DEPTH = 128
"""Deepest JSON nesting of one request object (the object is level 1). The decoder itself recurses
(and fails) near 1,000 levels; below this limit nothing downstream comes near Python's stack limit."""

_ENVELOPE = ("jsonrpc", "id", "method", "params")


@dataclass
class RequestContext:
    server: "Server"
    request_id: Any
    framing: Framing
    received_at: float
    accepted: threading.Event = field(default_factory=threading.Event)
    ticket: int = 0  # its place in the order of requests received (see drain.py)


def _handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt ``fn(ctx, params)`` to jsonrpcserver: SidecarError → its error object; an OSError on a
    path the client gave → PathError naming the field; anything else → -32603."""

    def call(ctx: RequestContext, /, *args: Any, **kwargs: Any) -> Any:
        # ``ctx`` is positional-only so that a params object may hold any key, "ctx" included.
        params = list(args) if args else kwargs
        try:
            return Success(fn(ctx, params))
        except errors.SidecarError as exc:
            return Error(exc.CODE, exc.message, exc.data or None)
        except Exception as exc:  # noqa: BLE001 - a method never kills the process
            mapped = path_error(exc, params)
            if mapped is not None:
                return Error(mapped.CODE, mapped.message, mapped.data or None)
            log.exception("internal error in %s", fn.__name__)
            return Error(errors.InternalError.CODE, f"Internal error: {type(exc).__name__}: {exc}", None)
        finally:
            ctx.accepted.set()

    call.__name__ = fn.__name__
    return call


# --- checks on what the client sent ---------------------------------------------------------------

def _clip(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def is_request_id(value: Any) -> bool:
    """JSON-RPC ids are strings, numbers or null (``True`` is not a number here)."""
    return value is None or type(value) in (str, int, float)


def check_request(element: Any) -> tuple[Any, errors.SidecarError | None]:
    """The id to answer with, and what is wrong with one request object (None when it is valid).

    The id is the request's own whenever it is a valid id, also for an invalid request, so a
    client's pending call is answered rather than left to time out; otherwise null (the spec's
    rule when the id cannot be detected)."""
    if not isinstance(element, dict):
        return None, errors.InvalidRequest(
            f"Invalid Request: expected a request object, got {_json_type(element)}")
    request_id = element.get("id")
    if not is_request_id(request_id):
        return None, errors.InvalidRequest(
            f"Invalid Request: `id` must be a string, a number or null, not {_json_type(request_id)}",
            field="id")
    if element.get("jsonrpc") != "2.0":
        return request_id, errors.InvalidRequest('Invalid Request: `jsonrpc` must be "2.0"', field="jsonrpc")
    method = element.get("method")
    if not isinstance(method, str):
        what = "missing" if method is None else f"a {_json_type(method)}, not a string"
        return request_id, errors.InvalidRequest(f"Invalid Request: `method` is {what}", field="method")
    if "params" in element and not isinstance(element["params"], (dict, list)):
        return request_id, errors.InvalidRequest(
            f"Invalid Request: `params` must be an object or an array, not {_json_type(element['params'])}",
            field="params")
    extra = [k for k in element if k not in _ENVELOPE]
    if extra:
        return request_id, errors.InvalidRequest(
            f"Invalid Request: unknown member `{_clip(extra[0])}` (a request has jsonrpc, id, method, params)",
            field=_clip(extra[0]))
    return request_id, None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def nesting_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` nests containers deeper than ``limit`` (``{}`` is depth 1).

    Iterative, so it cannot itself hit the recursion limit. Measured on a 60 MiB train request
    (228,780 examples, 2.3 M containers): 0.9 s against 1.8 s for decoding it, on a loaded 2-core
    machine; a request with fewer brackets than the limit is skipped before decoding, for free."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in (node.values() if type(node) is dict else node):
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def deepest_path(value: Any, limit: int) -> str:
    """JSON path (``$.params.x[0]``, clipped) of the first container past ``limit`` levels."""
    stack = [(value, 1, "$")]
    while stack:
        node, depth, at = stack.pop()
        if depth > limit:
            return at if len(at) <= 120 else at[:120] + "…"
        items = ((f".{_clip(k, 40)}", v) for k, v in node.items()) if type(node) is dict \
            else ((f"[{i}]", v) for i, v in enumerate(node))
        for step, child in items:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1, at + step if len(at) <= 120 else at))
    return "$"


def _candidate_paths(params: Any) -> Iterator[tuple[str, str]]:
    """(JSON path, value) of what may be a path the client gave: the path fields of a decoded params
    Struct, or the top-level strings of raw params."""
    if isinstance(params, msgspec.Struct):
        yield from wire.path_fields(params)
    elif isinstance(params, dict):
        for k, v in params.items():
            if isinstance(v, str):
                yield f"$.{k}", v


def path_error(exc: BaseException, params: Any) -> errors.PathError | None:
    """A PathError naming the params field when ``exc`` is an OSError about a path the client gave
    (the path itself, something inside it, or its ``<path>.tmp-<job>`` sibling)."""
    if not isinstance(exc, OSError):
        return None
    names = [str(n) for n in (exc.filename, exc.filename2) if isinstance(n, (str, bytes, os.PathLike))]
    for name in names:
        try:
            target = os.path.abspath(name)
        except (TypeError, ValueError):
            continue
        for at, value in _candidate_paths(params):
            try:
                given = os.path.abspath(os.path.expanduser(value))
            except (TypeError, ValueError):
                continue
            if target == given or target.startswith((given + os.sep, given + ".tmp-")):
                reason = exc.strerror or type(exc).__name__
                return errors.PathError(f"`{at}`: {reason}: {_clip(name, 200)}", field=at, path=name,
                                        reason=reason, errno=errno_names.errorcode.get(exc.errno or 0))
    return None


class Server:
    def __init__(self, reader: FrameReader, writer: MessageWriter, worker_thread: bool = True,
                 claims: Any = None, journal: Any = None, drain: bool = False) -> None:
        self.reader = reader
        self.drain = Drain(drain)  # shutdown {drain: true} and the --drain mode
        self.journal = journal  # sidecar.journal.Journal: train jobs on disk, for status after a restart
        self.writer = writer
        self.claims = claims  # housekeeping.Claims, or None (no crash clean-up)
        self._models = None
        self._supervisor = None
        self.shutdown_requested = False
        self.exit_requested = False
        self._stopping = threading.Lock()
        self._parent_pid = os.getppid()
        # Resident adapters (the genome): the registry answers adapters/list at once; everything that
        # touches a model (load, unload, compose, generate, export) runs on the job worker, in request order.
        self.adapters = AdapterRegistry()
        self.stack = Stack(self.adapters)
        kinds = {"train": "_run_train", "generate": "_run_generate", "export": "_run_export",
                 "adapters/load": "_run_adapters_load", "adapters/unload": "_run_adapters_unload",
                 "adapters/compose": "_run_adapters_compose"}
        self.jobs = JobQueue({kind: self._job_runner(name) for kind, name in kinds.items()},
                             notify=self._notify, max_queue=MAX_QUEUE, own_thread=worker_thread,
                             journal=journal)
        self.methods = {
            "supports": _handler(self.supports),
            "train": _handler(self.train),
            "cancel": _handler(self.cancel),
            "status": _handler(self.status),
            "generate": _handler(self.generate),
            "adapters/export": _handler(self.export_adapter),
            "shutdown": _handler(self.shutdown),
            "adapters/load": _handler(self.adapters_load),
            "adapters/unload": _handler(self.adapters_unload),
            "adapters/list": _handler(self.adapters_list),
            "adapters/compose": _handler(self.adapters_compose),
            "exit": _handler(self.exit),
            "$/cancelRequest": _handler(self.cancel_request),
        }

    # --- heavy pieces, imported lazily so the process answers `supports` before torch is loaded ---

    @property
    def models(self):
        if self._models is None:
            from .models import ModelCache

            self._models = ModelCache()
            self._models.on_evict.append(self.stack.forget)
        return self._models

    def _run_train(self, job: Job, report, should_stop) -> wire.TrainResult:
        if job.params.distributed is not None:
            result = self.supervisor.train(job.params, job_id=job.job_id, report=report, should_stop=should_stop,
                                           received_at=job.received_at)
        else:
            from .training import train

            # Training never sees a resident adapter: their layers come off every base (they go back on
            # at their next use), so the job trains on the bare base exactly as on a fresh sidecar.
            self.stack.strip()
            result = train(job.params, job_id=job.job_id, models=self.models, report=report,
                           should_stop=should_stop, received_at=job.received_at)
        if job.params.export:
            result = self._train_exports(job.params, result)
        if job.params.load:
            p = job.params
            try:
                outcome = self.adapters.load(result.adapter_path, models=self.models, base_model=p.base_model,
                                             device=p.device, dtype=p.dtype, trust_remote_code=p.trust_remote_code)
            except errors.SidecarError as exc:  # the adapter is written; say why it is not resident
                return msgspec.structs.replace(result, warnings=result.warnings + [
                    f"The adapter was written but not made resident: {exc.message}"])
            return msgspec.structs.replace(result, adapter_id=outcome.resident.id)
        return result

    def _train_exports(self, p: wire.TrainParams, result: wire.TrainResult) -> wire.TrainResult:
        """The exports a train job ends with; a failed one is a warning (the adapter is written)."""
        from .adapters.export import export_adapter

        done, notes = [], []
        for i, spec in enumerate(p.export or []):
            try:
                done.append(export_adapter(result.adapter_path, spec.format, output_path=spec.output_path,
                                           out_type=spec.out_type, base_model=p.base_model, models=self._models))
            except errors.SidecarError as exc:
                notes.append(f"export[{i}] ({spec.format}) was not written: {exc.message} (code {exc.CODE})")
        return msgspec.structs.replace(result, exports=done, warnings=result.warnings + notes)

    @property
    def supervisor(self):
        """Distributed jobs' worker groups (training/distributed.py; imports no torch)."""
        if self._supervisor is None:
            from .training.distributed import Supervisor

            self._supervisor = Supervisor()
        return self._supervisor

    def _run_generate(self, job: Job, report, should_stop) -> wire.GenerateResult:
        from .generate import generate

        return generate(job.params, models=self.models, registry=self.adapters, stack=self.stack,
                        should_stop=should_stop)

    def _run_adapters_load(self, job: Job, report, should_stop) -> wire.AdaptersLoadResult:
        p = job.params
        return self.adapters.load(p.path, models=self.models, adapter_id=p.id, pin=p.pin, base_model=p.base_model,
                                  device=p.device, dtype=p.dtype, trust_remote_code=p.trust_remote_code).result()

    def _run_adapters_unload(self, job: Job, report, should_stop) -> wire.AdaptersUnloadResult:
        resident = self.adapters.unload(job.params.id)
        return wire.AdaptersUnloadResult(id=resident.id, bytes_freed=resident.bytes,
                                         used_bytes=self.adapters.used_bytes())

    def _run_adapters_compose(self, job: Job, report, should_stop) -> wire.AdaptersComposeResult:
        from .adapters.compose import compose

        return compose(job.params, models=self.models, registry=self.adapters, stack=self.stack)

    def _job_runner(self, name: str) -> Callable[[Job, Any, Any], Any]:
        """The JobQueue runner for ``self.<name>``, looked up per job (tests wrap it), with an
        OSError about a path of the job's params turned into a PathError naming the field."""

        def run(job: Job, report: Any, should_stop: Any) -> Any:
            try:
                return getattr(self, name)(job, report, should_stop)
            except OSError as exc:
                mapped = path_error(exc, job.params)
                if mapped is None:
                    raise
                raise mapped from exc

        return run

    def _run_export(self, job: Job, report, should_stop) -> wire.ExportResult:
        # On the worker like train and generate: a merge reads a full fp32 copy of the base, which
        # must not run beside a training job, and the warm cache is consulted without locking.
        from .adapters.export import export_adapter

        p = job.params
        return export_adapter(p.adapter_path, p.format, output_path=p.output_path, out_type=p.out_type,
                              overwrite=p.overwrite, base_model=p.base_model, models=self._models)

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
                               max_message_bytes=self.reader.max_bytes, max_seq_length=131072,
                               max_nesting_depth=MAX_NESTING_DEPTH,
                               adapter_budget_bytes=self.adapters.budget_bytes),
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
        from .training.resume import prepare_request

        p = prepare_request(params, p)  # resumeFrom / initFrom: the job's stored params, checked
        check_sources(p)
        job = self.jobs.submit("train", p, job_id=p.job_id, base_model=p.base_model, received_at=ctx.received_at,
                               request_id=ctx.request_id, framing=ctx.framing,
                               progress_interval=p.progress_interval)
        if self.claims is not None:  # so that a crash while saving is cleaned up at the next start
            from .housekeeping import claim_for_output

            key = self.claims.add(*claim_for_output(p.output_path))
            job.future.add_done_callback(lambda _, key=key: self.claims.release(key))
        ctx.accepted.set()
        return wire.to_builtins(job.future.result())

    def generate(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.GenerateParams)
        from .generate import check_params

        try:
            check_params(p)
        except errors.AdapterNotFound:
            # Not written yet by a train job ahead of this one? Then it is checked when it runs.
            if p.adapter_path is None or not written_by_earlier_train(self.jobs, p.adapter_path):
                raise
        return self._queued(ctx, "generate", p, p.base_model)

    def _queued(self, ctx: RequestContext, kind: str, p: Any, base_model: str) -> Any:
        """Run ``p`` on the job worker (after the jobs ahead of it) and answer its result."""
        job = self.jobs.submit(kind, p, job_id=None, base_model=base_model, received_at=ctx.received_at,
                               request_id=ctx.request_id, framing=ctx.framing)
        ctx.accepted.set()
        return wire.to_builtins(job.future.result())

    def export_adapter(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.ExportParams)
        if (p.adapter_path is None) == (p.id is None):
            raise errors.InvalidParams("Give exactly one of adapterPath and id", field="$.adapterPath")
        if p.id is not None:
            p = msgspec.structs.replace(p, adapter_path=self._adapter_dir_for_id(p.id))
        return self._queued(ctx, "export", p, p.base_model or p.adapter_path)

    def _adapter_dir_for_id(self, adapter_id: str) -> str:
        """The directory a resident adapter was loaded from, provided its weights there are still
        the ones that are resident (an export must describe what the id answers with)."""
        from .files import ADAPTER_FILE, sha256_file

        resident = self.adapters.get(adapter_id, "$.id")
        weights = os.path.join(resident.path, ADAPTER_FILE)
        try:
            same = sha256_file(weights) == resident.sha256
        except OSError:
            same = False
        if not same:
            raise errors.AdapterNotFound(
                f"Resident adapter {adapter_id!r} was loaded from {resident.path}, whose weights are gone or have "
                "changed since; export that directory by adapterPath, or load it again", id=adapter_id,
                path=resident.path)
        return resident.path

    def adapters_load(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.AdaptersLoadParams)
        return self._queued(ctx, "adapters/load", p, p.base_model or "")

    def adapters_unload(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.AdaptersUnloadParams)
        return self._queued(ctx, "adapters/unload", p, "")

    def adapters_compose(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.AdaptersComposeParams)
        from .adapters.compose import check_params

        check_params(p)
        return self._queued(ctx, "adapters/compose", p, p.base_model or "")

    def adapters_list(self, ctx: RequestContext, params: Any) -> Any:
        wire.decode_params(params, wire.AdaptersListParams)
        return wire.to_builtins(self.adapters.summary())

    def cancel(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.CancelParams)
        state = self.jobs.cancel(p.job_id)
        if state == "unknown" and self.journal is not None:  # a job of an earlier process
            state = self.journal.cancel(p.job_id) or state
        return wire.to_builtins(wire.CancelResult(job_id=p.job_id, state=state))

    def cancel_request(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.CancelRequestParams)
        self.jobs.cancel_request(p.id)
        return None

    def status(self, ctx: RequestContext, params: Any) -> Any:
        wire.decode_params(params, wire.StatusParams)
        running, queued, recent = self.jobs.status()
        infos = [j.info() for j in recent]
        if self.journal is not None:  # with the jobs of earlier processes, interrupted ones included
            infos = self.journal.recent(infos)
        return wire.to_builtins(wire.StatusResult(
            running=running.info() if running else None, queued=[j.info() for j in queued],
            recent=infos, loaded_models=self._loaded(), adapters=self.adapters.summary()))

    def shutdown(self, ctx: RequestContext, params: Any) -> Any:
        p = wire.decode_params(params, wire.ShutdownParams)
        self.shutdown_requested = True
        if self.drain.wanted(p.drain):
            # New jobs are refused from now on, but the read loop goes on (cancel and status still
            # answer) while the jobs received before this request run to their end.
            self.jobs.refuse()
            ctx.accepted.set()
            log.info("shutdown: finishing %d earlier request(s) first", self.drain.pending() - 1)
            self.drain.shutdown(ctx.ticket)
        cancelled = self.jobs.stop(STOP_TIMEOUT)
        if self._models is not None:
            self._models.evict_all()
        return wire.to_builtins(wire.ShutdownResult(ok=True, cancelled_jobs=cancelled))

    def exit(self, ctx: RequestContext, params: Any) -> Any:
        self.exit_requested = True
        return None

    # --- the read loop ------------------------------------------------------------------------

    def serve(self) -> int:
        """Read and handle messages until ``exit`` or end of input, then stop; returns the exit code.

        Handling one message never ends the loop: whatever it raises is logged and answered. Only a
        failing read (the input stream itself broken) propagates, and the caller exits."""
        while not self.exit_requested:
            frame = self.reader.read()
            if frame is None:
                log.info("stdin closed; %s", "finishing what was received" if self.drain.mode else "stopping")
                break
            received_at = time.time()
            try:
                if frame.error is not None:
                    self._send_error(None, errors.InvalidRequest(frame.error), frame.framing)
                else:
                    self._handle(frame.body, frame.framing, received_at)
            except Exception:  # noqa: BLE001 - the read loop must outlive any one message
                log.exception("failed to handle a message; reading on")
                self._send_error(None, errors.InternalError("Internal error while handling a message; "
                                                            "see the sidecar's stderr"), frame.framing)
        code = 0 if self.shutdown_requested or not self.exit_requested else 1
        self.drain.settle()  # --drain, or a draining shutdown still waiting: answer everything first
        return self.stop(1 if self.drain.mode and self.drain.failed else code)

    def _handle(self, body: bytes, framing: Framing, received_at: float) -> None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._send_error(None, errors.ParseError(f"Parse error: invalid UTF-8 at byte {exc.start}",
                                                     position=exc.start), framing)
            return
        try:
            message = msgspec.json.decode(text)
        except RecursionError:
            self._send_error(None, errors.InvalidRequest(
                f"Invalid Request: JSON nested deeper than {MAX_NESTING_DEPTH} levels", limit=MAX_NESTING_DEPTH),
                framing)
            return
        except msgspec.DecodeError as exc:
            self._send_error(None, errors.ParseError(f"Parse error: {exc}"), framing)
            return
        # Fewer brackets than the limit cannot nest past it: most messages skip the walk.
        deep = body.count(b"[") + body.count(b"{") > MAX_NESTING_DEPTH
        if isinstance(message, list):
            if not message:
                self._send_error(None, errors.InvalidRequest("Invalid Request: empty batch"), framing)
                return
            self._handle_batch(message, framing, received_at, deep)
        else:
            self._start(message, framing, received_at, deep,
                        lambda response: response is not None and self._write(response, framing))

    def _handle_batch(self, elements: list, framing: Framing, received_at: float, deep: bool) -> None:
        """Each element is checked, dispatched and answered on its own (JSON-RPC 2.0 §6); the array
        of answers is written when the last one is ready, none at all for notifications only."""
        answers: list[Any] = [None] * len(elements)
        remaining = [len(elements)]
        lock = threading.Lock()

        def deliver_to(i: int) -> Callable[[Any], None]:
            def deliver(response: Any) -> None:
                with lock:
                    answers[i] = response
                    remaining[0] -= 1
                    done = remaining[0] == 0
                if done:
                    ready = [a for a in answers if a is not None]
                    if ready:
                        self._write(ready, framing)
            return deliver

        for i, element in enumerate(elements):
            self._start(element, framing, received_at, deep, deliver_to(i))

    def _start(self, element: Any, framing: Framing, received_at: float, deep: bool,
               deliver: Callable[[Any], Any]) -> None:
        """Check one request object and run it on its own thread; ``deliver`` receives its response
        (None for a notification). Returns once the request is accepted."""
        request_id = None
        try:
            request_id, problem = check_request(element)
            if problem is None and deep and nesting_exceeds(element, MAX_NESTING_DEPTH):
                problem = errors.InvalidRequest(
                    f"Invalid Request: JSON nested deeper than {MAX_NESTING_DEPTH} levels at "
                    f"{deepest_path(element, MAX_NESTING_DEPTH)}", limit=MAX_NESTING_DEPTH)
        except Exception:  # noqa: BLE001
            log.exception("checking a request failed")
            problem = errors.InternalError("Internal error while checking the request; see the sidecar's stderr")
        if problem is not None:
            # An invalid request is answered even without an id: it is not a valid notification.
            deliver(_error_response(request_id, problem))
            return
        notification = "id" not in element
        ctx = RequestContext(self, request_id, framing, received_at, ticket=self.drain.begin())

        def run() -> None:
            response = None
            try:
                response = dispatch_to_serializable("", self.methods, context=ctx,
                                                    deserializer=lambda _: element, validator=lambda _: None)
            except Exception:  # noqa: BLE001
                log.exception("dispatch failed")
                if not notification:
                    response = _error_response(request_id, errors.InternalError())
            finally:
                ctx.accepted.set()
            try:
                deliver(response)
            except Exception:  # noqa: BLE001
                log.exception("delivering a response failed")
            finally:
                self.drain.end(ctx.ticket)

        threading.Thread(target=run, name=f"request-{_clip(str(request_id), 40)}", daemon=True).start()
        ctx.accepted.wait()

    def _write(self, message: Any, framing: Framing) -> None:
        """Write a response or a batch of them; one that cannot be encoded becomes -32603 with its id."""
        self.drain.observe(message)
        try:
            self.writer.write(message, framing)
            return
        except Exception:  # noqa: BLE001 - an encoding bug must not cost the client its answer
            log.exception("could not encode a response")
        items = message if isinstance(message, list) else [message]
        fixed = []
        for item in items:
            try:
                msgspec.json.encode(item)
                fixed.append(item)
            except Exception:  # noqa: BLE001
                fixed.append(_error_response(item.get("id") if isinstance(item, dict) else None,
                                             errors.InternalError("Internal error: the response could not be encoded")))
        self.writer.write(fixed if isinstance(message, list) else fixed[0], framing)

    def _send_error(self, request_id: Any, exc: errors.SidecarError, framing: Framing) -> None:
        self.drain.failed = True
        self.writer.write(_error_response(request_id, exc), framing)

    # --- stopping -----------------------------------------------------------------------------

    def parent_gone(self) -> bool:
        """True once this process was re-parented: the process that started it has died."""
        return os.getppid() != self._parent_pid

    def stop(self, code: int, timeout: float = STOP_TIMEOUT) -> int:
        """Cancel every job and wait for the running one to end (it stops within a step), at most
        ``timeout`` s, and at most ``ORPHAN_GRACE`` s once the parent is gone; returns ``code``.

        A job that does not stop in time (a model load cannot be interrupted) is left behind: the
        caller exits anyway, and no half-written output survives outside a temporary directory."""
        with self._stopping:
            self.jobs.stop(0)
            deadline = time.monotonic() + timeout
            while not self.jobs.worker_done.wait(0.05):
                now = time.monotonic()
                if self.parent_gone():
                    deadline = min(deadline, now + ORPHAN_GRACE)
                if now >= deadline:
                    running, _, _ = self.jobs.status()
                    log.warning("job %s did not stop within %.1f s; exiting anyway",
                                running.job_id if running else "?", timeout)
                    break
            if self._supervisor is not None:  # the worker group goes with us, whatever happened
                self._supervisor.close()
            # Let handler threads write the responses of the jobs that just ended.
            time.sleep(0.05)
        return code


def _error_response(request_id: Any, exc: errors.SidecarError) -> dict:
    return {"jsonrpc": "2.0", "error": exc.to_error(), "id": request_id}


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies, so the sidecar never outlives it."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _watch_signals(on_signal: Callable[[int], None]) -> None:
    """Run ``on_signal`` on a thread of its own for SIGTERM and SIGINT.

    Python runs signal handlers on the main thread between bytecodes, and the main thread runs
    jobs: inside a long C call (a model load) a handler would wait. The C-level handler writes
    the signal number to a wakeup fd at once, and this thread reads it."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)  # the wakeup fd does the work

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    on_signal(signum)

    threading.Thread(target=watch, name="signals", daemon=True).start()


def _watch_parent(server: Server, on_orphaned: Callable[[], None], interval: float = 0.25) -> None:
    """Stop when re-parented, where PR_SET_PDEATHSIG does not exist (macOS) or did not fire."""

    def watch() -> None:
        while not server.parent_gone():
            time.sleep(interval)
        on_orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve_stdio(drain: bool = False) -> int:
    from .stdio import protect_stdout

    out = protect_stdout()
    logging.basicConfig(level=os.environ.get("LORA_SIDECAR_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    _die_with_parent()
    from . import housekeeping
    from .journal import Journal

    claims, _ = housekeeping.start()
    journal = Journal()
    journal.recover()  # jobs of a dead process become `interrupted`; old entries and temp dirs go
    writer = MessageWriter(out)
    # Jobs run on the main thread (see JobQueue); the protocol is read on a secondary one.
    server = Server(FrameReader(sys.stdin.buffer), writer, worker_thread=False, claims=claims, journal=journal,
                    drain=drain)

    def finish(code: int) -> None:
        try:
            writer.close()
        finally:
            # Handler threads are daemons, and torch may hold non-daemon threads: exit now.
            os._exit(code)

    def terminate(reason: str) -> None:
        log.info("%s; stopping", reason)
        code = 0
        try:
            code = server.stop(0)
            if server.drain.mode and (server.drain.failed or server.drain.pending()):
                code = 1  # a script cut short did not run to its end
        except BaseException:  # noqa: BLE001 - nothing may keep the process from exiting
            log.exception("stopping failed")
        finally:
            finish(code)

    def read_loop() -> None:
        code = 1
        try:
            code = server.serve()
        except BaseException:  # noqa: BLE001 - a dead reader must not leave a deaf process behind
            log.exception("the read loop failed; exiting")
            try:
                server.stop(1, timeout=ORPHAN_GRACE)
            except BaseException:  # noqa: BLE001
                pass
        finally:
            finish(code)

    def on_signal(signum: int) -> None:
        threading.Thread(target=terminate, args=(f"signal {signum}",), daemon=True).start()

    _watch_signals(on_signal)
    _watch_parent(server, lambda: terminate("parent process gone"))
    log.info("lora-sidecar %s ready (protocol %s, pid %d%s)", __version__, PROTOCOL_VERSION, os.getpid(),
             ", drain mode: end of input finishes the jobs" if drain else "")
    threading.Thread(target=read_loop, name="stdin-reader", daemon=True).start()
    server.jobs.work()
    while True:  # the reader thread ends the process; the main thread stays to receive signals
        time.sleep(3600)
