"""The application's stdout lines for ``lora-sidecar train --config`` (issue 22, item 4). No torch.

The application's step bridge reads the old trainer's stdout line by line; each line is one of:

- ``{"event":"step","step","loss","lr","epoch","memMb","tokenAccuracy","gradNorm"}`` — after an
  optimizer step, rate-limited like the stderr progress (at most one each ``interval`` seconds; the
  last step always); step numbers strictly increase;
- ``{"event":"checkpoint","step","path","sizeMb"}`` — each checkpoint written, never dropped;
- ``MEMORY_REPORT: {"phase","device","allocated_bytes","peak_bytes","process_rss_bytes"}`` — at each
  phase change (``loading``, ``preparing``, ``training``, ``evaluating``, ``saving``) and once with
  phase ``completed`` at the end. On a GPU ``allocated_bytes``/``peak_bytes`` are the allocator's
  current and peak tensor bytes; on the CPU (and MPS) they are the process's RSS and peak RSS;
- ``Final loss: X.XXXX`` — the last line, the result's ``finalLoss``.

``memMb`` is the device allocator's MiB on a GPU, the process's RSS in MiB elsewhere.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Optional, TextIO

from . import wire

MIB = 2**20


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size so far (``getrusage``), or None where the OS does not say."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _bytes(mb: Optional[float]) -> Optional[int]:
    return int(round(mb * MIB)) if mb is not None else None


def step_event(p: wire.Progress) -> dict[str, Any]:
    mem = p.memory or wire.MemoryNow()
    mem_mb = mem.device_allocated_mb if mem.device_allocated_mb is not None else mem.rss_mb
    return {"event": "step", "step": p.step, "loss": p.loss, "lr": p.learning_rate, "epoch": p.epoch,
            "memMb": mem_mb, "tokenAccuracy": p.token_accuracy, "gradNorm": p.grad_norm}


def checkpoint_event(ref: wire.CheckpointRef) -> dict[str, Any]:
    return {"event": "checkpoint", "step": ref.step, "path": ref.path, "sizeMb": round(ref.bytes / MIB, 3)}


def memory_report(phase: str, device: str, mem: Optional[wire.MemoryNow]) -> dict[str, Any]:
    mem = mem or wire.MemoryNow()
    rss = _bytes(mem.rss_mb)
    if mem.device_allocated_mb is not None:
        allocated, peak = _bytes(mem.device_allocated_mb), _bytes(mem.device_peak_mb)
    else:
        allocated, peak = rss, peak_rss_bytes()
        if peak is not None and rss is not None:
            peak = max(peak, rss)
    return {"phase": phase, "device": device, "allocated_bytes": allocated, "peak_bytes": peak,
            "process_rss_bytes": rss}


class EventLines:
    """Writes the lines above on ``out`` (the real stdout), whole lines, flushed one by one."""

    def __init__(self, out: TextIO, device: str, *, interval: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.device, self.interval, self.clock = out, device, interval, clock
        self.last_step = 0
        self.last_at = float("-inf")
        self.phase: Optional[str] = None

    def write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def event(self, obj: dict[str, Any]) -> None:
        self.write(json.dumps(obj, separators=(",", ":"), allow_nan=False))

    def memory(self, phase: str, mem: Optional[wire.MemoryNow]) -> None:
        self.write("MEMORY_REPORT: " + json.dumps(memory_report(phase, self.device, mem), separators=(",", ":")))

    def progress(self, p: wire.Progress) -> None:
        """Called with every progress report of the job."""
        if p.phase != self.phase:
            self.phase = p.phase
            self.memory(p.phase, p.memory)
        if p.checkpoint is not None:
            self.event(checkpoint_event(p.checkpoint))
        if p.phase != "training" or p.loss is None or p.step <= self.last_step:
            return
        now = self.clock()
        if now - self.last_at >= self.interval or (p.total_steps and p.step >= p.total_steps):
            self.last_step, self.last_at = p.step, now
            self.event(_finite(step_event(p)))

    def final(self, loss: float, mem: Optional[wire.MemoryNow]) -> None:
        self.memory("completed", mem)
        self.write(f"Final loss: {loss:.4f}")


def _finite(obj: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Infinity (JSON.parse rejects them): a non-finite number is sent as null."""
    return {k: (None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))) else v)
            for k, v in obj.items()}
