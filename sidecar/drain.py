"""Draining: finish what was received instead of cancelling it (``shutdown {drain: true}``, ``--drain``).

The server gives every request a ticket when it starts handling it and closes the ticket once the
request's answer is written (a notification: once it has run). Draining means waiting until the
tickets issued before a point are all closed: every job received before it has run to its end and
its answer is on stdout.

- ``shutdown {drain: true}`` waits for the tickets before its own, then answers.
- After the read loop ends (``exit`` or end of input) the server waits for every open ticket when
  the process runs in drain mode (``lora-sidecar --drain``), or when a draining shutdown is still
  waiting; otherwise it stops at once and cancels, as it always has.
- In drain mode the exit status says whether every answer was a success (``failed``).

SIGTERM, SIGINT and the parent's death never wait for a drain: they stop the process as before.
Imports no torch.
"""

from __future__ import annotations

import threading
from typing import Any


class Drain:
    def __init__(self, mode: bool = False) -> None:
        self.mode = mode
        """Drain mode: ``shutdown`` drains unless it says ``drain: false``; end of input finishes the jobs."""
        self.failed = False
        """Whether any response written so far was an error (a batch counts when one element is)."""
        self._cond = threading.Condition()
        self._next = 0
        self._open: set[int] = set()
        self._shutdowns = 0  # draining shutdowns still waiting

    # --- tickets -----------------------------------------------------------------------------

    def begin(self) -> int:
        """A ticket for a request the read loop is about to dispatch (call from the read loop)."""
        with self._cond:
            ticket = self._next
            self._next += 1
            self._open.add(ticket)
            return ticket

    def end(self, ticket: int) -> None:
        """The request's answer is written (or it needed none)."""
        with self._cond:
            self._open.discard(ticket)
            self._cond.notify_all()

    def wait_before(self, ticket: int) -> None:
        """Wait until every request received before ``ticket`` is answered."""
        with self._cond:
            self._cond.wait_for(lambda: not any(t < ticket for t in self._open))

    # --- shutdown {drain} and the end of the read loop -----------------------------------------

    def wanted(self, drain: bool | None) -> bool:
        """Whether a ``shutdown`` with this ``drain`` param drains (absent: the mode decides)."""
        return self.mode if drain is None else drain

    def shutdown(self, ticket: int) -> None:
        """A draining shutdown: wait for what came before it; the read loop's end waits for it."""
        with self._cond:
            self._shutdowns += 1
        try:
            self.wait_before(ticket)
        finally:
            with self._cond:
                self._shutdowns -= 1
                self._cond.notify_all()

    def settle(self) -> bool:
        """At the end of the read loop: in drain mode, or while a draining shutdown waits, wait for
        every request received to be answered. Returns whether it waited (False: stop at once)."""
        with self._cond:
            if not (self.mode or self._shutdowns):
                return False
            self._cond.wait_for(lambda: not self._open and not self._shutdowns)
            return True

    def pending(self) -> int:
        with self._cond:
            return len(self._open)

    # --- the exit status -----------------------------------------------------------------------

    def observe(self, message: Any) -> None:
        """Note a response about to be written; an error response marks the run as failed."""
        for item in message if isinstance(message, list) else [message]:
            if isinstance(item, dict) and "error" in item and "method" not in item:
                self.failed = True

