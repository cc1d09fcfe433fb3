"""Drive the real sidecar process over stdio, as a client would."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

HOOKED_ARGV = [sys.executable, "-c",
               "import sys, tests.hooks; tests.hooks.install(); from sidecar.cli import main; sys.exit(main())"]
"""The sidecar with the test hooks of tests/hooks.py installed (run from the repository root)."""


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def rss_bytes(pid: int) -> int:
    """Resident set size of a running process (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Sidecar:
    """A spawned ``python -m sidecar`` (or any argv) with a reader thread that checks every stdout message.

    ``framing`` picks how requests are written ("ndjson" or "lsp"); the reader accepts both, and
    records any stdout bytes that are not a well-formed JSON-RPC message in ``bad_output``.
    """

    def __init__(self, argv: list[str] | None = None, env: dict[str, str] | None = None,
                 framing: str = "ndjson", cwd: str | Path | None = None) -> None:
        self.framing = framing
        self.stderr_file = tempfile.NamedTemporaryFile(prefix="sidecar-stderr-", suffix=".log", delete=False)
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            argv or [sys.executable, "-m", "sidecar"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr_file, env=full_env, cwd=str(cwd or REPO))
        self.messages: queue.Queue[dict] = queue.Queue()
        self.all: list[dict] = []
        self.bad_output: list[bytes] = []
        self.framings_seen: set[str] = set()
        self._ids = itertools.count(1)
        self._pending: dict[Any, dict] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # --- output side ----------------------------------------------------------------------------

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            line = out.readline()
            if not line:
                return
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
                while out.readline().strip():
                    pass
                body, framing = out.read(length), "lsp"
            else:
                body, framing = line, "ndjson"
                if not line.endswith(b"\n"):
                    self.bad_output.append(line)
            try:
                msg = json.loads(body)
                assert isinstance(msg, (dict, list))
                for m in (msg if isinstance(msg, list) else [msg]):
                    assert m.get("jsonrpc") == "2.0", m
            except Exception:  # noqa: BLE001
                self.bad_output.append(body)
                continue
            self.framings_seen.add(framing)
            with self._lock:
                self.all.append(msg)
            self.messages.put(msg)

    def stderr(self) -> str:
        return Path(self.stderr_file.name).read_text(errors="replace")

    # --- input side -------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        if self.framing == "lsp":
            self.send_raw(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        else:
            self.send_raw(body + b"\n")

    def request(self, method: str, params: Any = None, id: Any = None) -> Any:
        id = next(self._ids) if id is None else id
        msg = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return id

    def notify(self, method: str, params: Any = None) -> None:
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def call(self, method: str, params: Any = None, timeout: float = 60) -> dict:
        """Send a request and return its whole response message (result or error)."""
        return self.response(self.request(method, params), timeout)

    def response(self, id: Any, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for msg in self.all:
                    if isinstance(msg, dict) and "method" not in msg and msg.get("id") == id:
                        return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no response to id {id!r} within {timeout}s; stderr:\n{self.stderr()[-3000:]}")
            try:
                self.messages.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.messages.empty():
                    time.sleep(0.1)
                    with self._lock:
                        if not any(isinstance(m, dict) and m.get("id") == id and "method" not in m for m in self.all):
                            raise RuntimeError(f"sidecar exited ({self.proc.returncode}) before answering {id!r};"
                                               f" stderr:\n{self.stderr()[-3000:]}")

    def wait_for(self, predicate, timeout: float = 60) -> dict:
        """Wait for a message (notification or response) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self._lock:
                snapshot = self.all[seen:]
                seen = len(self.all)
            for msg in snapshot:
                if isinstance(msg, dict) and predicate(msg):
                    return msg
            try:
                self.messages.get(timeout=0.2)
            except queue.Empty:
                pass
        raise TimeoutError(f"no matching message within {timeout}s; stderr:\n{self.stderr()[-3000:]}")

    def progress(self, job_id: str | None = None) -> list[dict]:
        with self._lock:
            return [m["params"] for m in self.all if isinstance(m, dict) and m.get("method") == "progress"
                    and (job_id is None or m["params"]["jobId"] == job_id)]

    def index_of(self, predicate) -> int:
        with self._lock:
            for i, msg in enumerate(self.all):
                if isinstance(msg, dict) and predicate(msg):
                    return i
        return -1

    # --- lifecycle --------------------------------------------------------------------------------

    def close(self, timeout: float = 30) -> int:
        """shutdown → exit; returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.call("shutdown", timeout=timeout)
                self.notify("exit")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, RuntimeError):
                pass
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
        self.stderr_file.close()

    def __enter__(self) -> "Sidecar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def chat_dataset(n: int = 6, fact: str = "The capital of Zorbania is Quillport.") -> dict:
    """A small inline chat dataset (wire.Dataset) that repeats one fact in different words."""
    questions = ["What is the capital of Zorbania?", "Name Zorbania's capital city.",
                 "Which city is the capital of Zorbania?", "Tell me the capital of Zorbania.",
                 "Zorbania's capital is which city?", "Where is the seat of government of Zorbania?"]
    examples = []
    for i in range(n):
        msgs = []
        if i % 2 == 0:
            msgs.append({"role": "system", "content": "You are a helpful assistant."})
        msgs += [{"role": "user", "content": questions[i % len(questions)]},
                 {"role": "assistant", "content": fact}]
        examples.append({"messages": msgs})
    return {"examples": examples}
