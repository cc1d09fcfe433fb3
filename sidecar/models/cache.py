"""``ModelCache``: base models kept loaded between jobs, keyed by ``ModelKey`` (model, device, dtype,
quantization), with LRU eviction by count and an optional parameter-memory budget."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Callable

from .. import errors, wire
from .devices import dtype_warning, quantization_support, select_device, select_dtype
from .embedded import ensure_embedded_checkpoint
from .load import load_model
from .loaded import LoadedModel, ModelKey, _tensor_bytes
from .resolve import ResolvedModel, resolve_model

log = logging.getLogger("sidecar.models")  # one logger name for the package, as before the split


def _parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a byte size: {text!r} (examples: 2000000000, 1.5G, 800MiB)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return _parse_bytes(value) if "BYTES" in name else int(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


class ModelCache:
    """Base models kept loaded between jobs, LRU-evicted by count and an optional memory budget.

    ``max_models`` / ``max_bytes`` default to ``LORA_SIDECAR_MAX_MODELS`` (else 2) and
    ``LORA_SIDECAR_MAX_MODEL_BYTES`` (e.g. ``6G``; else no budget). A model larger than the budget on
    its own is still kept (it is the one in use); everything older is evicted first.

    Thread-safe: ``loaded()`` answers at once even while another thread is loading a model.
    """

    def __init__(self, max_models: int | None = None, max_bytes: int | None = None) -> None:
        if max_models is None:
            max_models = _env_int("LORA_SIDECAR_MAX_MODELS") or 2
        if max_bytes is None:
            max_bytes = _env_int("LORA_SIDECAR_MAX_MODEL_BYTES")
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries; held only briefly
        self._load_lock = threading.Lock()  # one load at a time
        self.on_evict: list[Callable[[LoadedModel], None]] = []
        """Called for each evicted model before it is released (e.g. the adapter stack drops its state)."""

    def get(self, name: str, *, device: str = "auto", dtype: str = "auto", quantize_bits: int | None = None,
            trust_remote_code: bool = False, on_loading: Callable[[], None] | None = None) -> LoadedModel:
        """Return the model, loading it unless an entry with the same key is already warm.

        ``on_loading()`` is called just before an actual load or conversion. Raises ModelNotFound,
        ModelLoadFailed, OutOfMemory, Unsupported (device/dtype not available).
        """
        started = time.monotonic()
        resolved = resolve_model(name, convert=False)
        dev = select_device(device)
        torch_dtype = select_dtype(dev, dtype)
        warnings: list[str] = []
        bits = self._effective_bits(quantize_bits, dev, warnings)
        if (text := dtype_warning(dev, torch_dtype)) is not None:
            warnings.append(text)
        key = ModelKey(_identity(resolved), dev, torch_dtype, bits)

        with self._load_lock:
            hit = self._lookup(key)
            if hit is not None:
                return dataclasses.replace(hit, name=name, cached=True, load_seconds=time.monotonic() - started,
                                           warnings=hit.warnings + [w for w in warnings if w not in hit.warnings])
            if on_loading is not None:
                on_loading()
            if resolved.kind == "embedded" and not resolved.ready:
                resolved = dataclasses.replace(resolved, path=str(ensure_embedded_checkpoint()), ready=True)
            # Free the least recently used models before loading, not after, to keep the peak low.
            self._evict(keep=self.max_models - 1)
            entry = load_model(resolved, name, key, trust_remote_code=trust_remote_code, warnings=warnings)
            entry.load_seconds = time.monotonic() - started
            with self._lock:
                self._entries[key] = entry
            self._evict_to_budget(protect=key)
            log.info("Loaded %s (%s, %s) in %.2f s", name, dev, str(torch_dtype).removeprefix("torch."),
                     entry.load_seconds)
            return dataclasses.replace(entry, warnings=list(entry.warnings))

    def loaded(self) -> list[str]:
        """Names of the warm models, least recently used first."""
        with self._lock:
            return [entry.name for entry in self._entries.values()]

    def entries(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._entries.values())

    def evict_all(self) -> None:
        self._evict(keep=0)

    def unload(self, keys: set[ModelKey]) -> int:
        """Drop the entries under ``keys`` now (``models/unload``); returns the bytes they held (weights
        and what was derived from them). The memory goes back once no caller holds a view of them."""
        with self._lock:
            victims = [self._entries.pop(k) for k in list(self._entries) if k in keys]
        freed = sum(v.total_bytes() for v in victims)
        self._release(victims)
        return freed

    # -- internals --------------------------------------------------------------------------

    def _lookup(self, key: ModelKey) -> LoadedModel | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def _evict(self, keep: int) -> None:
        with self._lock:
            victims = []
            while len(self._entries) > max(keep, 0):
                victims.append(self._entries.popitem(last=False)[1])
        self._release(victims)

    def _evict_to_budget(self, protect: ModelKey) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            victims = []
            while sum(e.total_bytes() for e in self._entries.values()) > self.max_bytes:
                oldest = next(iter(self._entries))
                if oldest == protect:
                    break
                victims.append(self._entries.pop(oldest))
        self._release(victims)

    def _release(self, victims: list[LoadedModel]) -> None:
        if not victims:
            return
        for victim in victims:
            log.info("Evicting %s (%s) from the model cache", victim.name, victim.device)
            for callback in self.on_evict:
                callback(victim)
        on_cuda = any(v.device.startswith("cuda") for v in victims)
        victims.clear()
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    @staticmethod
    def _effective_bits(quantize_bits: int | None, device: str, warnings: list[str]) -> int | None:
        if quantize_bits is None:
            return None
        if quantize_bits not in (4, 8):
            raise errors.Unsupported(f"quantize_bits must be 4 or 8, not {quantize_bits}")
        support = quantization_support()
        if not device.startswith("cuda"):
            warnings.append(f"{quantize_bits}-bit quantization was requested but needs a CUDA GPU "
                            f"(device is {device}); the model was loaded without quantization.")
            return None
        if not support.four_bit:
            warnings.append(f"{quantize_bits}-bit quantization was requested but is unavailable "
                            f"({support.reason}); the model was loaded without quantization.")
            return None
        return quantize_bits


def warm_model(entry: LoadedModel, residents: list[str] | None = None,
               held_by: str = "sidecar") -> wire.WarmModel:
    """``status``'s view of one cache entry: its bytes (weights, and the bf16 copies derived from them),
    the resident adapters on it, and the process whose cache holds it. Safe beside the job's thread: the
    derived dict is copied first (its values are replaced whole, never changed in place)."""
    derived = _tensor_bytes(dict(entry.derived))
    return wire.WarmModel(name=entry.name, path=entry.resolved.path, device=entry.device,
                          dtype=str(entry.dtype).replace("torch.", ""), quantize_bits=entry.key.quantize_bits,
                          weights_bytes=entry.nbytes, bf16_copy_bytes=derived, total_bytes=entry.nbytes + derived,
                          residents=residents or [], held_by=held_by)


def _identity(resolved: ResolvedModel) -> str:
    if resolved.gguf_file:
        return os.path.join(resolved.path, resolved.gguf_file)
    return resolved.path
