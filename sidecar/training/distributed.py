"""Supervisor side of distributed training (work in progress)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional


def die_with_parent(parent: Optional[int], sig: int = signal.SIGKILL) -> None:
    """Linux: receive ``sig`` when the parent process ends; exit now if ``parent`` is already gone."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)
