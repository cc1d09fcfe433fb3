"""A small Python client for the sidecar: spawn it, call methods, receive notifications.

Used by the demo and the benchmark; the TypeScript client in ts-client/ is the product's client.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any, Callable


class RemoteError(Exception):
    def __init__(self, error: dict) -> None:
        super().__init__(f"{error.get('message')} (code {error.get('code')})")
        self.code = error.get("code")
        self.message = error.get("message")
        self.data = error.get("data")


class SidecarClient:
    def __init__(self, argv: list[str] | None = None, env: dict[str, str] | None = None,
                 stderr: Any = None, on_notification: Callable[[str, Any], None] | None = None) -> None:
        self.proc = subprocess.Popen(argv or [sys.executable, "-m", "sidecar"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, env=env)
        self.on_notification = on_notification
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "method" in msg:
                if self.on_notification:
                    self.on_notification(msg["method"], msg.get("params"))
                continue
            with self._lock:
                fut = self._pending.pop(msg.get("id"), None)
            if fut is not None:
                fut.set_result(msg)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(RuntimeError(f"sidecar exited with code {self.proc.wait()}"))

    def send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def call_async(self, method: str, params: Any = None) -> Future:
        id = next(self._ids)
        fut: Future = Future()
        with self._lock:
            self._pending[id] = fut
        self.send({"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}})
        return fut

    def call(self, method: str, params: Any = None, timeout: float | None = None) -> Any:
        msg = self.call_async(method, params).result(timeout)
        if "error" in msg:
            raise RemoteError(msg["error"])
        return msg["result"]

    def close(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            try:
                self.call("shutdown", timeout=timeout)
                self.send({"jsonrpc": "2.0", "method": "exit"})
                self.proc.stdin.close()
            except (OSError, RuntimeError, RemoteError):
                pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
