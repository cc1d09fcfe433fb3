"""Processes: who wrote something (identity), whether that process still lives, and dying with a
parent. No torch.

An identity is ``{"pid", "boot", "started"}``: the pid alone is not enough, because after a reboot
or a long run the kernel hands the same pid to another process. The boot id and the process's start
time (clock ticks since boot) tell a reused pid apart. Where ``/proc`` does not exist (macOS) they
are None and only the pid is compared.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("sidecar.procs")

_PR_SET_PDEATHSIG = 1


@lru_cache(maxsize=1)
def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> Optional[int]:
    """Linux: the process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_identity() -> dict[str, Any]:
    """This process's identity, as recorded in journal entries and ``params.json``."""
    pid = os.getpid()
    return {"pid": pid, "boot": _boot_id(), "started": _start_ticks(pid)}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(owner: Optional[dict[str, Any]]) -> bool:
    """Whether the process of a recorded identity still runs (False for a missing or malformed one)."""
    if not owner or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("boot") and _boot_id() and owner["boot"] != _boot_id():
        return False
    if not pid_alive(owner["pid"]):
        return False
    started = _start_ticks(owner["pid"])
    return owner.get("started") is None or started is None or started == owner["started"]


def die_with_parent(parent: Optional[int], sig: int = signal.SIGKILL) -> None:
    """Linux: receive ``sig`` when the parent process ends; exit now if ``parent`` is already gone.

    ``parent`` is the pid this process must not outlive (None: nothing to do). The check after
    ``prctl`` closes the race of a parent that ended before the death signal was armed. Elsewhere
    (macOS), or where libc cannot be loaded, this does nothing: the caller keeps its own watch
    (the server polls for re-parenting)."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except OSError as exc:
        log.debug("PR_SET_PDEATHSIG is not available: %s", exc)
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident set in MiB: ``VmHWM`` of /proc/self/status on Linux, which counts
    this program's memory only. ``ru_maxrss`` is the fallback elsewhere; on Linux it is not used because
    it also keeps the peak of the image that exec replaced — a sidecar spawned by a parent holding
    2 GiB reported 2 GiB there before it had loaded anything (seen in the suite: 1868 MiB against
    750 MiB measured alone)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB elsewhere
