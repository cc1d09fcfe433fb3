"""Which device and dtype a job runs on, what this machine offers, and the per-job thread setting.

Plain answers only (``Device``, ``QuantSupport``): the server turns them into wire Structs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors

if TYPE_CHECKING:  # torch is imported lazily: `supports` must answer fast
    import torch

# torch's default (one thread per core) is right on a quiet machine; on a shared one, fewer threads
# than cores avoid OpenMP threads spinning against other processes (measured here with another
# busy process: 1 thread 92 tokens/s, 2 threads 22-32 tokens/s on SmolLM2).
THREADS_ENV = "LORA_SIDECAR_THREADS"


@dataclass(frozen=True)
class Device:
    """One device this process could train on."""

    type: str
    """``cpu`` | ``cuda`` | ``mps``."""
    name: str
    memory_bytes: int | None = None
    bf16: bool = False
    """Native bf16 (fast); elsewhere bf16 runs, far slower than fp32."""


@dataclass(frozen=True)
class QuantSupport:
    """Whether 4-bit / 8-bit (bitsandbytes) loading works here; ``reason`` says why not."""

    four_bit: bool
    eight_bit: bool
    reason: str | None = None


def apply_thread_setting() -> None:
    """Apply ``LORA_SIDECAR_THREADS`` (compute threads per job) when set; called at each job."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        import torch

        try:
            n = int(value)
        except ValueError:
            raise errors.InvalidParams(f"{THREADS_ENV} must be a whole number, not {value!r}") from None
        if n > 0 and torch.get_num_threads() != n:
            torch.set_num_threads(n)


def select_device(requested: str = "auto") -> str:
    """``auto`` → cuda > mps > cpu. An explicit device that is not available raises Unsupported."""
    import torch

    requested = (requested or "auto").lower()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_ok else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise errors.Unsupported("Device 'cuda' was requested but no CUDA GPU is available", device=requested)
        return requested
    if requested == "mps":
        if not mps_ok:
            raise errors.Unsupported("Device 'mps' was requested but MPS is not available", device=requested)
        return "mps"
    raise errors.Unsupported(f"Unknown device {requested!r} (use auto, cpu, cuda or mps)", device=requested)


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def select_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """``auto``: bf16 on a CUDA GPU that supports it, else fp32 (CPU, MPS, older GPUs).

    Explicit values are honoured; see ``dtype_warning`` for the ones that are slow where they run.
    """
    import torch

    requested = (requested or "auto").lower()
    if requested == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if requested not in _DTYPES:
        raise errors.Unsupported(f"Unknown dtype {requested!r} (use auto, float32, bfloat16 or float16)")
    return getattr(torch, _DTYPES[requested])


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
    import torch

    probe = getattr(torch, "cpu", None)
    try:
        return bool(probe._is_avx512_bf16_supported() or probe._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: read the CPU flags
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_warning(device: str, dtype: torch.dtype) -> str | None:
    import torch

    if device == "cpu" and dtype == torch.float16:
        return ("dtype float16 on CPU is much slower than float32; use dtype 'auto' (fp32 weights, bf16 "
                "matmuls where the CPU has native bf16) or 'float32' on CPU.")
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return ("dtype bfloat16 on a CPU without native bf16 instructions is much slower than float32 "
                "(about 10x measured on such a CPU); use dtype 'auto' or 'float32' here.")
    return None


def device_report() -> list[Device]:
    """Every device this process could train on: cpu always, then CUDA GPUs, then MPS."""
    import platform

    import torch

    try:
        cpu_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        cpu_memory = None
    cpu_name = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    # bf16 on a CPU: True only with native bf16 instructions (AVX512_BF16 / AMX); elsewhere it runs, but
    # far slower than fp32.
    devices = [Device(type="cpu", name=cpu_name, memory_bytes=cpu_memory, bf16=cpu_has_native_bf16())]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            bf16 = props.major >= 8  # native bf16 arrived with Ampere
            devices.append(Device(type="cuda", name=props.name, memory_bytes=props.total_memory, bf16=bf16))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(Device(type="mps", name="Apple MPS", memory_bytes=None, bf16=True))
    return devices


def quantization_support() -> QuantSupport:
    """Whether 4-bit/8-bit (bitsandbytes) loading works here, and why not when it does not."""
    import torch

    if not torch.cuda.is_available():
        return QuantSupport(four_bit=False, eight_bit=False, reason="4-bit and 8-bit quantization need a CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        return QuantSupport(four_bit=False, eight_bit=False, reason="bitsandbytes is not installed")
    return QuantSupport(four_bit=True, eight_bit=True)
