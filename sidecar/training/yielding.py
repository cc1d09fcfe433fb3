"""``train {yield}``: a job that pauses by itself while the rest of the machine keeps every core busy.

The rule (docs/PROTOCOL.md, "Background jobs"): every ``SAMPLE_SECONDS`` the job's process reads the
OS's own accounting — ``/proc/stat`` (CPU time of every core, all processes) minus its own threads'
(``/proc/self/task/*/stat``, utime + stime) — and takes ``L``, the cores the other processes used
over the sample, of ``n`` cores.

- busy: ``L ≥ f·n`` — every core at least ``f`` used by others;
- idle: ``n − L ≥ f`` — at least ``f`` of one core unused.

The job is paused (gate reason ``busy``) once every sample over ``windowSeconds`` was busy, and
resumed once every sample over ``holdSeconds`` was idle; in between it stays as it is (hysteresis).
Linux only; elsewhere ``monitor`` does nothing (the caller warns).

No torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Iterator, Optional

from .. import wire
from .pause import PauseGate

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.25
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/stat")


def machine_busy_ticks() -> int:
    """Clock ticks of CPU time spent by everything since boot, all cores (/proc/stat's ``cpu`` line:
    user, nice, system, irq, softirq, steal; idle and iowait left out)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    values = [int(v) for v in fields[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def own_ticks(pid: str = "self") -> int:
    """Clock ticks of CPU time used by every thread of this process (utime + stime of each task)."""
    total = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile; its time moved to the process's totals
            continue
        total += int(rest[11]) + int(rest[12])
    return total


class Sampler:
    """``L`` (cores used by other processes) over the time since the previous sample."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.last = (time.monotonic(), machine_busy_ticks(), own_ticks())

    def sample(self) -> float:
        now = (time.monotonic(), machine_busy_ticks(), own_ticks())
        seconds = now[0] - self.last[0]
        others = (now[1] - self.last[1]) - (now[2] - self.last[2])
        self.last = now
        if seconds <= 0:
            return 0.0
        return min(float(self.cores), max(0.0, others / _TICK / seconds))


class Hysteresis:
    """The decision, apart from the clock and /proc (testable with made-up loads)."""

    def __init__(self, policy: wire.YieldPolicy, cores: int) -> None:
        self.policy, self.cores = policy, cores
        self.paused = False
        self.since: Optional[float] = None  # when the current run of busy (or idle) samples began

    def update(self, load: float, now: float) -> Optional[bool]:
        """Feed one sample; returns True (pause), False (resume) or None (no change)."""
        f = self.policy.busy_fraction
        wanted = load >= f * self.cores if not self.paused else not (self.cores - load >= f)
        if wanted == self.paused:  # the sample keeps the current state
            self.since = None
            return None
        if self.since is None:
            self.since = now - SAMPLE_SECONDS
        needed = self.policy.hold_seconds if self.paused else self.policy.window_seconds
        if now - self.since + 1e-9 < needed:
            return None
        self.paused, self.since = wanted, None
        return wanted


@contextlib.contextmanager
def monitor(policy: Optional[wire.YieldPolicy], gate: PauseGate) -> Iterator[None]:
    """While inside, pause and resume ``gate`` (reason ``busy``) by the rule above."""
    if policy is None or not policy.when_busy or not supported():
        yield
        return
    done = threading.Event()
    thread = threading.Thread(target=_watch, args=(policy, gate, done), name="sidecar-yield", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2)
        gate.resume("busy")


def _watch(policy: wire.YieldPolicy, gate: PauseGate, done: threading.Event) -> None:
    sampler = Sampler()
    decide = Hysteresis(policy, sampler.cores)
    while not done.wait(SAMPLE_SECONDS):
        try:
            load = sampler.sample()
        except OSError:
            continue
        change = decide.update(load, time.monotonic())
        if change is True:
            log.info("yield: the machine is busy (%.2f of %d cores used by others): pausing", load, sampler.cores)
            gate.pause("busy")
        elif change is False:
            log.info("yield: a core is idle (%.2f of %d cores used by others): resuming", load, sampler.cores)
            gate.resume("busy")
