"""Framing only: read JSON-RPC messages from stdin, write them to a private copy of stdout.

Two framings are accepted, detected per message, and each reply uses the framing of the request
it answers:

- ``ndjson``: one UTF-8 JSON text per line (CRLF tolerated, empty lines skipped);
- ``lsp``: ``Content-Length: N`` headers, a blank line, then N bytes (what vscode-jsonrpc's
  StreamMessageWriter sends).

No torch, no dispatch here.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import msgspec

Framing = Literal["ndjson", "lsp"]

MAX_MESSAGE_BYTES = int(os.environ.get("LORA_SIDECAR_MAX_MESSAGE_BYTES", 64 * 1024 * 1024))
_DISCARD_CHUNK = 1 << 20


def protect_stdout() -> BinaryIO:
    """Keep a private duplicate of fd 1 for protocol output and point fd 1 (and sys.stdout) at stderr.

    Called before heavy imports so that library ``print``s, tqdm bars and even C-level writes to
    file descriptor 1 land on stderr and can never corrupt the protocol stream.
    """
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "wb")


@dataclass
class Frame:
    """One message read from the stream: ``body`` bytes, or ``error`` text when it could not be read."""

    framing: Framing
    body: bytes | None = None
    error: str | None = None


class FrameReader:
    def __init__(self, stream: BinaryIO, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.stream = stream
        self.max_bytes = max_bytes

    def read(self) -> Frame | None:
        """Next frame, or None at end of input."""
        while True:
            line = self.stream.readline(self.max_bytes + 1)
            if not line:
                return None
            if len(line) > self.max_bytes and not line.endswith(b"\n"):
                self._discard_rest_of_line()
                return Frame("ndjson", error=f"Message longer than {self.max_bytes} bytes; skipped to the next line")
            stripped = line.strip()
            if not stripped:
                continue
            if stripped[:15].lower() == b"content-length:":
                return self._read_lsp(stripped)
            return Frame("ndjson", body=stripped)

    def _discard_rest_of_line(self) -> None:
        while True:
            chunk = self.stream.readline(_DISCARD_CHUNK)
            if not chunk or chunk.endswith(b"\n"):
                return

    def _read_lsp(self, first_header: bytes) -> Frame | None:
        headers = [first_header]
        while True:
            line = self.stream.readline(8192)
            if not line:
                return None
            line = line.strip()
            if not line:
                break
            headers.append(line)
        length = None
        for header in headers:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return Frame("lsp", error=f"Bad Content-Length header: {header[:100]!r}")
        if length is None or length < 0:
            return Frame("lsp", error="Missing Content-Length")
        if length > self.max_bytes:
            remaining = length
            while remaining:
                chunk = self.stream.read(min(remaining, _DISCARD_CHUNK))
                if not chunk:
                    return None
                remaining -= len(chunk)
            return Frame("lsp", error=f"Message of {length} bytes is longer than {self.max_bytes}; skipped")
        body = self.stream.read(length)
        if len(body) < length:
            return None
        return Frame("lsp", body=body)


_encoder = msgspec.json.Encoder()


def encode(message: Any) -> bytes:
    """JSON bytes with U+2028/U+2029 escaped (they break line-oriented JavaScript readers).

    msgspec writes NaN/Infinity as null, so a diverged loss can never produce invalid JSON.
    """
    data = _encoder.encode(message)
    return data.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")


class MessageWriter:
    """Writes whole messages under one lock, flushed, in the framing asked for."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.closed = False

    def write(self, message: Any, framing: Framing = "ndjson") -> None:
        data = encode(message)
        if framing == "lsp":
            data = b"Content-Length: %d\r\n\r\n" % len(data) + data
        else:
            data += b"\n"
        with self.lock:
            if self.closed:
                return
            try:
                self.stream.write(data)
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                # The parent is gone; keep running down cleanly rather than dying mid-job.
                self.closed = True
