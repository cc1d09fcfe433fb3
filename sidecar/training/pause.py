"""Pausing a running job: the ``PauseGate`` it passes at each pause point, and ``release`` (free memory).

The gate is the job's ``should_stop``: the recipe polls it before every micro-batch (and every
evaluation batch, and between loading and training), so those are the pause points. Called there,
it answers True when the job is cancelled, False when it may go on — and while a pause is wanted
it parks the calling thread on a condition variable until resume or cancel. Parked means blocked in
the kernel: the job uses no CPU (torch's OpenMP threads sleep too, once their spin ends).

A pause has reasons: ``client`` (``pause``) and ``busy`` (``yield``, training/yielding.py). The job
runs only when no reason holds it. Hooks:

- ``release_hook()`` → checkpoint ref or None: set by the training loop; called on the job's thread
  before it parks when the pause asked for ``release`` (the loop writes the checkpoint there). A
  release then drops the bf16 weight copies (training/bf16.py) and frees memory (``free_memory``); the
  copies are made again on the job's thread when it resumes, before it goes on;
- ``on_paused(reason, released, checkpoint)`` / ``on_resumed()``: the job's owner (jobs.py, or the
  background process's serve loop) tells the client.

No torch at import.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

REASONS = ("client", "busy")


class PauseGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.cancelled = False
        self.reasons: set[str] = set()
        self.release = False
        self.parked = False
        self.release_hook: Optional[Callable[[], Any]] = None
        self.on_paused: Optional[Callable[[str, bool, Any], None]] = None
        self.on_resumed: Optional[Callable[[], None]] = None

    # --- the job's side -------------------------------------------------------------------------

    def __call__(self) -> bool:
        """A pause point: True when the job must stop (cancelled); parks while a pause holds it."""
        with self._cond:
            if self.cancelled or not self.reasons:
                return self.cancelled
            release, reason = self.release, self._reason()
        released, checkpoint = False, None
        if release:
            checkpoint = self.release_hook() if self.release_hook is not None else None
            _derived("release_copies")  # the bf16 weight copies (training/bf16.py), rebuilt on resume
            free_memory()
            released = True
        if self.on_paused is not None:
            self.on_paused(reason, released, checkpoint)
        with self._cond:
            self.parked = True
            while self.reasons and not self.cancelled:
                self._cond.wait()
            self.parked = False
            self.release = False
            cancelled = self.cancelled
        if released and not cancelled:
            _derived("rebuild_copies")
        if not cancelled and self.on_resumed is not None:
            self.on_resumed()
        return cancelled

    def _reason(self) -> str:
        return "client" if "client" in self.reasons else next(iter(self.reasons))

    # --- the askers' side ------------------------------------------------------------------------

    def pause(self, reason: str = "client", release: bool = False) -> None:
        with self._cond:
            self.reasons.add(reason)
            self.release = self.release or release

    def resume(self, reason: str = "client") -> bool:
        """Drop ``reason``; True when nothing holds the job any more."""
        with self._cond:
            self.reasons.discard(reason)
            if not self.reasons:
                self.release = False
            self._cond.notify_all()
            return not self.reasons

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def holds(self, reason: Optional[str] = None) -> bool:
        with self._cond:
            return bool(self.reasons) if reason is None else reason in self.reasons


def _derived(action: str) -> None:
    """Release or rebuild what the job derived from the base's weights: training/bf16.py's copies, when
    that module is in use in this process (looked up, not imported: no torch here)."""
    bf16 = sys.modules.get(__name__.rpartition(".")[0] + ".bf16")
    if bf16 is not None:
        result = getattr(bf16, action)()
        log.info("pause: %s -> %s", action, result)


def free_memory() -> None:
    """What a released pause gives back: Python garbage, the CUDA allocator's cache, and the C heap's
    free pages (glibc ``malloc_trim``)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
