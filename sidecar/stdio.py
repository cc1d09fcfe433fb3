"""Framing only: read JSON-RPC messages from stdin, write them to a private copy of stdout.

Two framings are accepted, detected per message, and each reply uses the framing of the request
it answers:

- ``ndjson``: one UTF-8 JSON text per line (CRLF tolerated, empty lines skipped);
- ``lsp``: ``Content-Length: N`` headers, a blank line, then N bytes (what vscode-jsonrpc's
  StreamMessageWriter sends).

No torch, no dispatch here.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import msgspec

Framing = Literal["ndjson", "lsp"]

log = logging.getLogger("sidecar.stdio")

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
    # Unbuffered: MessageWriter writes each message whole, so no bytes can stay behind in a
    # buffer whose flush would fail (and stop the exit) once the parent has gone.
    return os.fdopen(proto_fd, "wb", buffering=0)


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
    """Writes whole messages under one lock, in the framing asked for.

    A write that fails (the reader has gone: EPIPE, a closed stream) closes the writer: later
    messages are dropped and nothing is left buffered, so neither a job nor the exit path can be
    stopped by a dead stdout. ``write`` never raises for I/O; an unencodable message raises
    before anything is written.
    """

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
                view = memoryview(data)
                while view:
                    n = self.stream.write(view)
                    if n is None:  # a non-blocking stream that is full: treat the reader as gone
                        raise BlockingIOError("protocol stream would block")
                    view = view[n:]
                self.stream.flush()
            except (OSError, ValueError) as exc:
                # BrokenPipeError, a closed file, ...: the parent is gone; keep running down cleanly.
                log.info("protocol output closed (%s); dropping further messages", type(exc).__name__)
                self._drop()

    def close(self) -> None:
        """Stop writing and release the stream; never raises."""
        with self.lock:
            self._drop()

    def _drop(self) -> None:
        self.closed = True
        stream, self.stream = self.stream, _Discard()
        try:
            stream.close()
        except (OSError, ValueError):  # a buffered stream's final flush can fail the same way
            pass


class _Discard:
    def write(self, data: Any) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
