"""The sidecar's side of ``priority: "background"`` jobs: the job process (training/solo.py), started
on the first background job and kept warm for the next, and one job run on it.

The job worker waits here as for any job: progress from the process becomes the job's progress; the
job's gate (training/pause.py) is forwarded — a ``pause`` / ``resume`` / ``cancel`` of the client
becomes a message to the process, whose own gate parks its job — and the process's ``paused`` /
``resumed`` reach the job queue through the same hooks an in-process job's gate calls. A process
that ends without answering fails the job with BackgroundProcessDied; the next job starts a new
one. The process also reports its warm models (``status.models``, marked ``heldBy: "background"``)
and unloads them on ``models/unload``. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import msgspec

from .. import errors, wire
from . import priority
from .pause import PauseGate

log = logging.getLogger("sidecar.background")

READY_TIMEOUT = 60.0
"""Seconds the new process may take to say ready (it says so before importing torch)."""
POLL_SECONDS = 0.1
UNLOAD_TIMEOUT = 60.0
"""Seconds the process may take to answer ``unload`` (dropping a model and trimming the heap: < 1 s)."""


class BackgroundProcess:
    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self.buffer = b""
        self.applied: dict[str, Any] = {}
        self.models: list[wire.WarmModel] = []
        """The process's warm models as it last reported them (it does at each phase change of a job,
        pause, resume, the job's end and an unload)."""
        self._lock = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    # --- the process ---------------------------------------------------------------------------

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        env = priority.background_env(dict(os.environ))
        root = str(Path(__file__).resolve().parents[2])  # the directory that holds the sidecar package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.training.solo", "--fd", str(theirs.fileno()),
                 "--parent", str(os.getpid())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock, self.buffer = ours, b""
        hello = self._receive(READY_TIMEOUT)
        if hello is None or hello.get("type") != "ready":
            self.kill()
            raise errors.BackgroundProcessDied("The background job process did not start", exitStatus=None)
        self.applied = hello.get("applied") or {}
        log.info("background job process %d started (%s)", self.proc.pid, self.applied)

    def warm(self) -> list[wire.WarmModel]:
        """``status``: the warm models of the process, marked as held by it (none once it is gone)."""
        return list(self.models) if self.pid is not None else []

    def unload(self, path: str) -> tuple[list[wire.WarmModel], int]:
        """``models/unload``, on the job worker (so no background job runs): the process drops every warm
        entry of the model at ``path`` and frees their memory; returns what went and its bytes."""
        with self._lock:
            if self.pid is None or self.sock is None:
                return [], 0
            try:
                self._send({"type": "unload", "path": path})
                while (message := self._receive(UNLOAD_TIMEOUT)) is not None:
                    if message.get("type") == "models":
                        self._set_models(message)
                    elif message.get("type") == "unloaded":
                        self._set_models(message)
                        return ([msgspec.convert(m, wire.WarmModel) for m in message["unloaded"]],
                                int(message["bytesFreed"]))
                    elif not message:
                        break  # no answer in time: the process is stuck or busy; leave it be
            except OSError as exc:
                log.warning("background job process: unload failed (%s)", exc)
            return [], 0

    def _set_models(self, message: dict[str, Any]) -> None:
        self.models = [msgspec.convert(m, wire.WarmModel) for m in message.get("models") or []]

    def kill(self) -> None:
        self.models = []
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Ask the process to exit (sidecar shutdown), then make sure."""
        with self._lock:
            if self.sock is not None and self.proc is not None and self.proc.poll() is None:
                try:
                    self._send({"type": "exit"})
                    self.proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self.kill()

    def _send(self, message: dict[str, Any]) -> None:
        assert self.sock is not None
        self.sock.sendall(msgspec.json.encode(message) + b"\n")

    def _receive(self, timeout: float) -> Optional[dict[str, Any]]:
        """The next message; {} when none came within ``timeout``; None at EOF."""
        assert self.sock is not None
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return {}
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    # --- one job ---------------------------------------------------------------------------------

    def train(self, params: wire.TrainParams, *, job_id: str, report: Callable[[wire.Progress], None],
              gate: PauseGate, received_at: float) -> wire.TrainResult:
        with self._lock:
            if self.pid is None:
                self.kill()
                report(wire.Progress(job_id=job_id, phase="loading", message="starting the background job process"))
                self.start()
            try:
                self._send({"type": "job", "jobId": job_id, "params": msgspec.to_builtins(params),
                            "receivedAt": received_at})
                return self._follow(job_id, report, gate)
            except OSError as exc:
                raise self._died(job_id, exc) from exc

    def _follow(self, job_id: str, report: Callable[[wire.Progress], None], gate: PauseGate) -> wire.TrainResult:
        cancel_sent, client_pause = False, False
        while True:
            if gate.cancelled and not cancel_sent:
                self._send({"type": "cancel"})
                cancel_sent = True
            wanted = gate.holds("client")
            if wanted != client_pause and not cancel_sent:
                self._send({"type": "pause", "release": gate.release} if wanted else {"type": "resume"})
                client_pause = wanted
            message = self._receive(POLL_SECONDS)
            if message is None:
                raise self._died(job_id, None)
            kind = message.get("type")
            if kind == "progress":
                report(msgspec.convert(message["progress"], wire.Progress))
            elif kind == "models":
                self._set_models(message)
            elif kind == "paused":
                if message["reason"] == "busy":
                    gate.pause("busy")  # so that a client's resume answers "paused" while yield holds it
                gate.parked = True
                checkpoint = message.get("checkpoint")
                if gate.on_paused is not None:
                    gate.on_paused(message["reason"], bool(message.get("released")),
                                   msgspec.convert(checkpoint, wire.CheckpointRef) if checkpoint else None)
            elif kind == "resumed":
                gate.parked = False
                gate.resume("busy")
                if gate.on_resumed is not None:
                    gate.on_resumed()
            elif kind == "result":
                return msgspec.convert(message["result"], wire.TrainResult)
            elif kind == "error":
                cls = next((c for c in errors.ALL_ERRORS if c.CODE == message["code"]), errors.TrainingFailed)
                raise cls(message["message"], **(message.get("data") or {}))

    def _died(self, job_id: str, exc: Optional[BaseException]) -> errors.SidecarError:
        proc, pid = self.proc, self.proc.pid if self.proc is not None else None
        status = None
        if proc is not None:
            try:
                status = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        detail = f" ({exc})" if exc is not None else ""
        return errors.BackgroundProcessDied(
            f"The background job process (pid {pid}) ended without an answer, exit status {status}{detail}",
            jobId=job_id, pid=pid, exitStatus=status)
