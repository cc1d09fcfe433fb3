"""A job's CPU priority and thread count: what ``train {priority, threads}`` asks of the OS.

``background`` lowers a whole process, once, before torch starts (``lower_this_process``): every
thread created afterwards — torch's intra-op OpenMP pool, its inter-op pool, the autograd engine's
— inherits the scheduling class and the I/O priority of the thread that created it, so nothing that
computes for the job is left at normal priority. Per OS:

- Linux: ``SCHED_IDLE`` (the thread runs only on a core no other runnable thread wants) and the idle
  I/O class (``ioprio_set``, IOPRIO_CLASS_IDLE: its checkpoint and adapter writes wait for a quiet
  disk). An unprivileged process cannot leave ``SCHED_IDLE`` again (the kernel needs CAP_SYS_NICE or
  an RLIMIT_NICE that allows nice 0), which is why background jobs get a process of their own
  (training/background.py) instead of lowering the sidecar's threads and restoring them.
- macOS: ``setpriority(PRIO_DARWIN_PROCESS, 0, PRIO_DARWIN_BG)`` (background QoS: low CPU and I/O
  priority, throttled).
- elsewhere: nice 19.

The OpenMP wait policy is an environment setting libgomp reads once at start (``background_env``):
passive waiting (``OMP_WAIT_POLICY=PASSIVE``, ``GOMP_SPINCOUNT=0``) parks a background job's idle
threads on a futex instead of spinning against the foreground; normal jobs keep libgomp's default
(a short spin, measured faster: docs/PERFORMANCE.md).

No torch at import.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from typing import Any, Iterator, Optional

from .. import errors

log = logging.getLogger(__name__)

PRIORITY_ENV = "LORA_SIDECAR_PRIORITY"
THREADS_ENV = "LORA_SIDECAR_THREADS"
SPIN_ENV = "LORA_SIDECAR_BACKGROUND_SPINCOUNT"
"""Set: a background job's OpenMP threads spin this many times before sleeping (instead of passive)."""
PRIORITIES = ("normal", "background")

# Linux ioprio (include/uapi/linux/ioprio.h)
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_WHO_PROCESS = 1
_SYS_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31), "arm64": (30, 31)}  # (ioprio_set, ioprio_get)
# macOS sys/resource.h
_PRIO_DARWIN_PROCESS = 4
_PRIO_DARWIN_BG = 0x1000

POLICY_NAMES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
                6: "SCHED_DEADLINE"}


def default_priority() -> str:
    """``LORA_SIDECAR_PRIORITY`` (normal | background), else normal."""
    value = os.environ.get(PRIORITY_ENV, "").strip().lower()
    if not value:
        return "normal"
    if value not in PRIORITIES:
        raise errors.InvalidParams(f"{PRIORITY_ENV} must be normal or background, not {value!r}",
                                   field="priority")
    return value


def background_env(base: dict[str, str]) -> dict[str, str]:
    """The environment of a background job's process: passive OpenMP waiting (read once by libgomp
    at start, so it must be in the environment before torch loads)."""
    env = dict(base)
    env.pop("OMP_NUM_THREADS", None)  # the job's `threads` decide (torch.set_num_threads)
    env["TQDM_DISABLE"] = "1"
    spin = base.get(SPIN_ENV, "").strip()
    if spin:  # a measured alternative: spin this many times before sleeping (libgomp's own default: 300000)
        env.pop("OMP_WAIT_POLICY", None)
        env["GOMP_SPINCOUNT"] = spin
    else:
        env.update(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="0", KMP_BLOCKTIME="0")
    return env


# ---------------------------------------------------------------------------------------------
# Lowering a process (the background job's, at its start)
# ---------------------------------------------------------------------------------------------

def lower_this_process() -> dict[str, Any]:
    """Lower the calling thread — call it before any other thread exists, so that all inherit it —
    to the lowest CPU and I/O priority available without privileges. Returns what was applied."""
    applied: dict[str, Any] = {}
    if sys.platform.startswith("linux"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            applied["sched"] = "SCHED_IDLE"
        except (OSError, AttributeError) as exc:
            log.warning("SCHED_IDLE not available (%s); using nice 19", exc)
            applied["nice"] = _nice19()
        applied["ioprio"] = "idle" if _ioprio_idle() else None
    elif sys.platform == "darwin":
        try:
            libc = ctypes.CDLL("libc.dylib", use_errno=True)
            if libc.setpriority(_PRIO_DARWIN_PROCESS, 0, _PRIO_DARWIN_BG) != 0:
                raise OSError(ctypes.get_errno(), "setpriority(PRIO_DARWIN_BG)")
            applied["darwin"] = "PRIO_DARWIN_BG"
        except OSError as exc:
            log.warning("PRIO_DARWIN_BG not available (%s); using nice 19", exc)
            applied["nice"] = _nice19()
    else:
        applied["nice"] = _nice19()
    return applied


def _nice19() -> Optional[int]:
    try:
        return os.nice(19 - os.nice(0))
    except (OSError, AttributeError):
        return None


def _ioprio_idle() -> bool:
    """ioprio_set(IOPRIO_WHO_PROCESS, 0, IDLE): the calling thread (and the threads it creates)."""
    numbers = _SYS_IOPRIO.get(os.uname().machine)
    if numbers is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        value = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
        return libc.syscall(numbers[0], _IOPRIO_WHO_PROCESS, 0, value) == 0
    except OSError:
        return False


def io_class(tid: int) -> Optional[int]:
    """The I/O priority class of a thread (Linux; None elsewhere): 0 none, 1 rt, 2 best-effort, 3 idle."""
    numbers = _SYS_IOPRIO.get(os.uname().machine) if sys.platform.startswith("linux") else None
    if numbers is None:
        return None
    value = ctypes.CDLL(None, use_errno=True).syscall(numbers[1], _IOPRIO_WHO_PROCESS, tid)
    return None if value < 0 else value >> _IOPRIO_CLASS_SHIFT


def thread_policies(pid: int) -> dict[int, str]:
    """Every thread of ``pid`` and its scheduling policy, read back from the OS (Linux)."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(name)] = POLICY_NAMES.get(os.sched_getscheduler(int(name)), "?")
        except OSError:  # the thread ended meanwhile
            continue
    return found


# ---------------------------------------------------------------------------------------------
# Threads of one job
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def job_threads(threads: Optional[int]) -> Iterator[None]:
    """``train {threads}`` for the job run inside: torch's compute threads capped at ``threads`` (and at
    ``LORA_SIDECAR_THREADS`` when that is set and lower); torch's count before the job is put back
    after it, so the next job is not capped."""
    if threads is None:
        yield
        return
    import torch

    before_threads, before_env = torch.get_num_threads(), os.environ.get(THREADS_ENV)
    cap = threads
    if before_env and before_env.strip().isdigit() and int(before_env) > 0:
        cap = min(cap, int(before_env))
    # The recipe applies LORA_SIDECAR_THREADS at each job (models.apply_thread_setting): the job's cap
    # is put there for its duration, read only by this (the job's) thread.
    os.environ[THREADS_ENV] = str(cap)
    torch.set_num_threads(cap)
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before_env
        torch.set_num_threads(before_threads)
