"""The worker group of a distributed job: one torchrun launcher and its ranks, each connected to
the supervisor (training/distributed.py) over a Unix socket in a private temporary directory.

``WorkerGroup`` starts the launcher and waits for every rank (``start``), runs one job on the ranks
and gathers their answers (``run``), and stops them: ``close`` asks, ``kill`` makes sure —
SIGKILL to every worker's process group, then the launcher; nothing survives. A rank that dies
fails the job with WorkerDied (its rank, pid, exit status and the last lines of its stderr); one
that cannot start fails it with WorkerStartFailed. Messages are JSON, one per line
(training/worker.py describes them). No torch here.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import msgspec

from .. import errors, wire

log = logging.getLogger("sidecar.distributed")

WORKER_THREADS_ENV = "LORA_SIDECAR_WORKER_THREADS"
START_TIMEOUT = float(os.environ.get("LORA_SIDECAR_GROUP_START_TIMEOUT", 600))
"""Seconds a new group may take until every rank is ready (process start, imports, rendezvous)."""
FAILURE_GRACE = 5.0
"""After a rank fails, seconds to wait for the others' answers and the launcher's report."""
STDERR_TAIL = 20


def worker_threads(processes: int) -> int:
    """Compute threads per worker: LORA_SIDECAR_WORKER_THREADS, else the cores shared out."""
    value = os.environ.get(WORKER_THREADS_ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise errors.InvalidParams(f"{WORKER_THREADS_ENV} must be a whole number, not {value!r}") from None
    return max(1, (os.cpu_count() or 1) // processes)


@dataclass(frozen=True)
class GroupKey:
    """What a worker group is started with; a job with another key needs another group."""

    processes: int
    strategy: str
    backend: Optional[str]
    device: str
    threads: int


class _Rank:
    """The supervisor's end of one rank's connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.rank: Optional[int] = None
        self.pid: Optional[int] = None
        self.closed = False

    def fileno(self) -> int:  # for select()
        return self.sock.fileno()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(msgspec.json.encode(message) + b"\n")

    def read(self) -> list[dict[str, Any]]:
        """The messages that arrived (call when the socket is readable); sets ``closed`` at EOF."""
        try:
            chunk = self.sock.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


@dataclass
class _Answers:
    """What the ranks answered to one job."""

    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)
    dead: list[int] = field(default_factory=list)  # ranks whose connection ended unanswered, in order
    first_failure: Optional[float] = None

    def answered(self, rank: int) -> bool:
        return rank in self.results or rank in self.errors or rank in self.dead


class WorkerGroup:
    """One torchrun launcher and its ranks, each connected to this supervisor."""

    def __init__(self, key: GroupKey) -> None:
        self.key = key
        self.dir = Path(tempfile.mkdtemp(prefix="lora-sidecar-group-"))
        self.socket_path = str(self.dir / "sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        self.listener.listen(key.processes)
        self.ranks: dict[int, _Rank] = {}
        self.pending: list[_Rank] = []  # accepted, no hello yet
        self.proc: Optional[subprocess.Popen] = None
        self.output: collections.deque[str] = collections.deque(maxlen=400)
        self._forwarder: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.stopped = False
        self.started_seconds = 0.0

    # --- start -------------------------------------------------------------------------------

    def command(self) -> list[str]:
        k = self.key
        worker = ["-m", "sidecar.training.worker", "--connect", self.socket_path, "--strategy", k.strategy,
                  "--device", k.device] + (["--backend", k.backend] if k.backend else [])
        return [sys.executable, "-m", "sidecar.training.distributed", "--parent", str(os.getpid()), "--",
                "--standalone", "--nnodes=1", f"--nproc-per-node={k.processes}", "--max-restarts=0",
                "--monitor-interval=0.1", f"--log-dir={self.dir / 'logs'}", "--redirects=3", "--tee=3",
                *worker]

    def start(self, job_id: str, report: Callable[[wire.Progress], None], should_stop: Callable[[], bool]) -> None:
        """Launch the group and wait until every rank has joined the process group."""
        t0 = time.monotonic()
        threads = str(self.key.threads)
        env = {**os.environ, "LORA_SIDECAR_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "LORA_SIDECAR_MAX_MODELS": "1"}
        log.info("starting a worker group: %d × %s (%s, %d thread(s) each)", self.key.processes,
                 self.key.strategy, self.key.device, self.key.threads)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._forwarder = threading.Thread(target=self._forward_output, name="group-output", daemon=True)
        self._forwarder.start()
        ready: set[int] = set()
        while len(ready) < self.key.processes:
            if should_stop():
                self.kill()
                raise errors.RequestCancelled(f"Job {job_id} cancelled", jobId=job_id, stepsCompleted=0)
            if self.proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT:
                why = (f"the launcher exited with code {self.proc.returncode}" if self.proc.poll() is not None
                       else f"not every rank was ready after {START_TIMEOUT:.0f} s")
                self._fail_start(why)
            readable, _, _ = select.select([self.listener, *self.pending, *self.ranks.values()], [], [], 0.1)
            for item in readable:
                if item is self.listener:
                    conn, _ = self.listener.accept()
                    self.pending.append(_Rank(conn))
                    continue
                for message in item.read():
                    if message["type"] == "hello":
                        item.rank, item.pid = message["rank"], message["pid"]
                        self.pending.remove(item)
                        self.ranks[item.rank] = item
                    elif message["type"] == "ready":
                        ready.add(item.rank)
                    elif message["type"] == "error":
                        self._fail_start(f"rank {item.rank} failed to start: {message['message']}", item.rank)
                if item.closed and item.rank not in ready:
                    self._fail_start(f"rank {item.rank} exited while starting", item.rank)
        self.started_seconds = time.monotonic() - t0
        log.info("worker group ready in %.1f s: launcher pid %d, worker pids %s", self.started_seconds,
                 self.proc.pid, json.dumps(self.pids()))
        report(wire.Progress(job_id=job_id, phase="loading",
                             message=f"{self.key.processes} worker processes ready "
                                     f"(pids {', '.join(str(p) for p in self.pids().values())})"))

    def _fail_start(self, why: str, rank: Optional[int] = None) -> None:
        time.sleep(0.5)  # let the launcher print its report
        tails = {r: self.stderr_tail(r) for r in ([rank] if rank is not None else range(self.key.processes))}
        launcher = list(self.output)[-STDERR_TAIL:]
        self.kill()
        lines = [f"--- rank {r} ---\n" + "\n".join(t) for r, t in tails.items() if t]
        raise errors.WorkerStartFailed(
            f"The worker group did not start: {why}.\n" + ("\n".join(lines) if lines else
                                                             "Launcher output:\n" + "\n".join(launcher)),
            rank=rank, stderrTail=tails.get(rank) if rank is not None else launcher)

    def _forward_output(self) -> None:
        """Copy the launcher's output (and the ranks' tee'd lines) to the sidecar's stderr."""
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.output.append(line)
            try:
                sys.stderr.write(f"[group] {line}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    # --- state -------------------------------------------------------------------------------

    def pids(self) -> dict[int, int]:
        return {r: c.pid for r, c in sorted(self.ranks.items()) if c.pid is not None}

    def healthy(self) -> bool:
        """The launcher runs and every rank's connection is open (a rank idle between jobs says nothing)."""
        if self.stopped or self.proc is None or self.proc.poll() is not None:
            return False
        readable, _, _ = select.select(list(self.ranks.values()), [], [], 0)
        for r in readable:
            if r.read() or r.closed:  # an idle worker sends nothing: data or EOF means trouble
                return False
        return True

    def stderr_tail(self, rank: int, lines: int = STDERR_TAIL) -> list[str]:
        """The last lines of a rank's stderr, from torchrun's per-rank log file."""
        files = glob.glob(str(self.dir / "logs" / "*" / "attempt_*" / str(rank) / "stderr.log"))
        if not files:
            return []
        try:
            text = Path(max(files, key=os.path.getmtime)).read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def exit_status(self, rank: int) -> Optional[str]:
        """How the launcher says ``rank`` ended (e.g. ``exitcode -9``), from its failure report."""
        text = "\n".join(self.output)
        for block in re.split(r"\n\s*\[\d+\]:\n", text):
            m = re.search(rf"rank\s*:\s*{rank}\b.*?\n\s*exitcode\s*:\s*(-?\d+)", block, re.S)
            if m:
                code = int(m.group(1))
                return f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit code {code}"
        return None

    # --- one job -------------------------------------------------------------------------------

    def run(self, params: wire.TrainParams, *, job_id: str, received_at: float,
            report: Callable[[wire.Progress], None], should_stop: Callable[[], bool],
            temp_output: Optional[Path]) -> wire.TrainResult:
        message = {"type": "job", "jobId": job_id, "receivedAt": received_at,
                   "params": msgspec.to_builtins(params)}
        answers = _Answers()
        for r in self.ranks.values():
            try:
                r.send(message)
            except OSError:
                r.closed = True
                answers.dead.append(r.rank)
                answers.first_failure = time.monotonic()
        step = 0
        n = self.key.processes
        while True:
            open_ranks = [r for r in self.ranks.values() if not r.closed]
            readable, _, _ = select.select(open_ranks, [], [], 0.1)
            for r in readable:
                for m in r.read():
                    if m["type"] == "progress":
                        progress = msgspec.convert(m["progress"], wire.Progress)
                        step = max(step, progress.step)
                        report(progress)
                    elif m["type"] in ("result", "done"):
                        answers.results[r.rank] = m
                    elif m["type"] == "error":
                        answers.errors[r.rank] = m
                        answers.first_failure = answers.first_failure or time.monotonic()
                if r.closed and not answers.answered(r.rank):
                    answers.dead.append(r.rank)
                    answers.first_failure = answers.first_failure or time.monotonic()
            if all(answers.answered(r) for r in range(n)):
                break
            if answers.first_failure is not None and time.monotonic() - answers.first_failure > FAILURE_GRACE:
                break
            if should_stop() and not answers.results.get(0):
                self.kill()
                _remove(temp_output)
                raise errors.RequestCancelled(f"Job {job_id} cancelled", jobId=job_id, stepsCompleted=step)

        if answers.dead:
            raise self._worker_died(answers, job_id, step, temp_output)
        if answers.errors:
            # Every rank answered: the group is consistent and stays warm. Otherwise some rank is
            # still inside a collective that will never complete: stop the group.
            if not all(answers.answered(r) for r in range(n)):
                self.kill()
                _remove(temp_output)
            rank = min(answers.errors)
            raise _error_from(answers.errors[rank], rank, job_id, step)
        return msgspec.convert(answers.results[0]["result"], wire.TrainResult)

    def _worker_died(self, answers: _Answers, job_id: str, step: int,
                     temp_output: Optional[Path]) -> errors.SidecarError:
        # The launcher notices the death within its monitor interval (0.1 s), stops the other ranks
        # and reports the first failure, usually within a second; then make sure nothing is left.
        deadline = time.monotonic() + 10
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher_root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", "\n".join(self.output), re.S)
        rank = answers.dead[0]
        if launcher_root and int(launcher_root.group(1)) in answers.dead:
            rank = int(launcher_root.group(1))
        pid = self.ranks[rank].pid
        status = self.exit_status(rank)
        tail = self.stderr_tail(rank)
        self.kill()
        _remove(temp_output)
        how = f" ({status})" if status else ""
        return errors.WorkerDied(
            f"Worker rank {rank} (pid {pid}) died{how} during job {job_id} at step {step}; the worker "
            f"group was stopped. Last lines of its stderr:\n" + ("\n".join(tail) or "(empty)"),
            jobId=job_id, rank=rank, pid=pid, exitStatus=status, stepsCompleted=step, stderrTail=tail)

    # --- stop ----------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Ask the ranks to exit, then make sure they did."""
        if self.stopped:
            return
        for r in self.ranks.values():
            try:
                r.send({"type": "exit"})
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker's process group, then the launcher's; reap the launcher."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            launcher = self.proc.pid if self.proc is not None else None
            for pid in self.pids().values():
                if _child_of(pid, launcher):
                    _killpg(pid)
            if self.proc is not None:
                try:  # the launcher exits by itself once its workers are gone (and reaps them)
                    self.proc.wait(2)
                except subprocess.TimeoutExpired:
                    _killpg(self.proc.pid)
                    self.proc.wait()
            for r in [*self.ranks.values(), *self.pending]:
                r.sock.close()
            self.listener.close()
            if self._forwarder is not None:
                self._forwarder.join(2)
            shutil.rmtree(self.dir, ignore_errors=True)
            log.info("worker group stopped (launcher pid %s, worker pids %s)", launcher, json.dumps(self.pids()))


def _child_of(pid: int, parent: Optional[int]) -> bool:
    """``pid`` still runs as a child of ``parent`` (so it is ours, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return sys.platform != "linux" and parent is not None
    fields = stat.rsplit(")", 1)[1].split()
    return parent is not None and int(fields[1]) == parent and fields[0] != "Z"


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(path: Optional[Path]) -> None:
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _error_from(message: dict[str, Any], rank: int, job_id: str, step: int) -> errors.SidecarError:
    cls = next((c for c in errors.ALL_ERRORS if c.CODE == message["code"]), errors.TrainingFailed)
    data = {**(message.get("data") or {}), "jobId": job_id}
    data.setdefault("stepsCompleted", step)
    if rank != 0:
        data["rank"] = rank
    text = message["message"] if rank == 0 else f"rank {rank}: {message['message']}"
    return cls(text, **data)

