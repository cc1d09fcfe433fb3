"""The stdio JSON-RPC server's lifecycle: build the app, the read loop, stopping, signals and the
parent watch. Dispatch is rpc.py's; the handlers are in methods/.

The process ends on ``exit``, stdin EOF, SIGTERM/SIGINT or its parent's death, within a bounded time
whatever the running job does (see ``Server.stop``). Nothing a client sends can stop the read loop:
whatever handling one message raises is logged and answered, and only a failing read (the input
stream itself broken) ends it. stdout carries the protocol only (``stdio.protect_stdout``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from . import PROTOCOL_VERSION, __version__, errors, rpc, wire
from . import methods  # noqa: F401 - importing it registers every handler with rpc.method
from .app import STOP_TIMEOUT, App
from .drain import Drain
from .jobs import Job
from .procs import die_with_parent
from .stdio import FrameReader, MessageWriter

log = logging.getLogger("sidecar.server")

ORPHAN_GRACE = 0.5
"""Once the parent is gone nobody reads the answers: a job gets this long to stop, then the
process exits anyway (a half-written adapter is only ever a temporary directory, removed at the
next start-up; see housekeeping.py)."""
MAX_QUEUE = int(os.environ.get("LORA_SIDECAR_MAX_QUEUE", 8))


class Server:
    def __init__(self, reader: FrameReader, writer: MessageWriter, worker_thread: bool = True,
                 claims: Any = None, journal: Any = None, drain: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.app = App(notify=self._notify, max_queue=MAX_QUEUE, max_message_bytes=reader.max_bytes,
                       worker_thread=worker_thread, claims=claims, journal=journal, drain=Drain(drain))
        self.drain = self.app.drain
        self.dispatcher = rpc.Dispatcher(self.app, writer, self.drain)
        self._stopping = threading.Lock()
        self._parent_pid = os.getppid()

    def _notify(self, job: Job, progress: wire.Progress) -> None:
        self.writer.write({"jsonrpc": "2.0", "method": "progress", "params": wire.to_builtins(progress)},
                          job.framing)

    def serve(self) -> int:
        """Read and handle messages until ``exit`` or end of input, then stop; returns the exit code.

        Handling one message never ends the loop: whatever it raises is logged and answered. Only a
        failing read (the input stream itself broken) propagates, and the caller exits."""
        app = self.app
        while not app.exit_requested:
            frame = self.reader.read()
            if frame is None:
                log.info("stdin closed; %s", "finishing what was received" if self.drain.mode else "stopping")
                break
            received_at = time.time()
            try:
                if frame.error is not None:
                    self.dispatcher.send_error(None, errors.InvalidRequest(frame.error), frame.framing)
                else:
                    self.dispatcher.handle(frame.body, frame.framing, received_at)
            except Exception:  # noqa: BLE001 - the read loop must outlive any one message
                log.exception("failed to handle a message; reading on")
                self.dispatcher.send_error(None, errors.InternalError(
                    "Internal error while handling a message; see the sidecar's stderr"), frame.framing)
        code = 0 if app.shutdown_requested or not app.exit_requested else 1
        self.drain.settle()  # --drain, or a draining shutdown still waiting: answer everything first
        return self.stop(1 if self.drain.mode and self.drain.failed else code)

    # --- stopping -----------------------------------------------------------------------------

    def parent_gone(self) -> bool:
        """True once this process was re-parented: the process that started it has died."""
        return os.getppid() != self._parent_pid

    def stop(self, code: int, timeout: float = STOP_TIMEOUT) -> int:
        """Cancel every job and wait for the running one to end (it stops within a step), at most
        ``timeout`` s, and at most ``ORPHAN_GRACE`` s once the parent is gone; returns ``code``.

        A job that does not stop in time (a model load cannot be interrupted) is left behind: the
        caller exits anyway, and no half-written output survives outside a temporary directory."""
        jobs = self.app.jobs
        with self._stopping:
            jobs.stop(0)
            deadline = time.monotonic() + timeout
            while not jobs.worker_done.wait(0.05):
                now = time.monotonic()
                if self.parent_gone():
                    deadline = min(deadline, now + ORPHAN_GRACE)
                if now >= deadline:
                    running, _, _ = jobs.status()
                    log.warning("job %s did not stop within %.1f s; exiting anyway",
                                running.job_id if running else "?", timeout)
                    break
            self.app.close()  # the worker group goes with us, whatever happened
            # Let handler threads write the responses of the jobs that just ended.
            time.sleep(0.05)
        return code


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


def _build(drain: bool) -> tuple[Server, MessageWriter]:
    """stdout kept for the protocol, logging on stderr, the crash clean-up and the journal recovered."""
    from . import housekeeping
    from .journal import Journal
    from .stdio import protect_stdout

    out = protect_stdout()
    logging.basicConfig(level=os.environ.get("LORA_SIDECAR_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    die_with_parent(os.getppid(), signal.SIGTERM)  # the sidecar never outlives its parent
    claims, _ = housekeeping.start()
    journal = Journal()
    journal.recover()  # jobs of a dead process become `interrupted`; old entries and temp dirs go
    writer = MessageWriter(out)
    # Jobs run on the main thread (see JobQueue); the protocol is read on a secondary one.
    server = Server(FrameReader(sys.stdin.buffer), writer, worker_thread=False, claims=claims, journal=journal,
                    drain=drain)
    return server, writer


def serve_stdio(drain: bool = False) -> int:
    server, writer = _build(drain)

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
    server.app.jobs.work()
    while True:  # the reader thread ends the process; the main thread stays to receive signals
        time.sleep(3600)
