"""What a model-cache entry is: a ``LoadedModel``, the ``ModelKey`` it is cached under, its fingerprint."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .resolve import ResolvedModel

if TYPE_CHECKING:  # torch and transformers are imported lazily: `supports` must answer fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelKey(NamedTuple):
    """What makes two loads the same model in the cache."""

    path: str
    """The resolved path or repo id (joined with the .gguf file name for kind ``gguf``)."""
    device: str
    dtype: torch.dtype
    quantize_bits: int | None
    """4 or 8 when the model was loaded quantized, else None."""


class _Shared:
    """State shared by every LoadedModel view of one cache entry (the fingerprint is computed once)."""

    def __init__(self) -> None:
        self.fingerprint: str | None = None
        self.lock = threading.Lock()
        self.derived: dict[str, Any] = {}


@dataclass
class LoadedModel:
    key: ModelKey
    name: str
    model: PreTrainedModel
    """Base model: eval mode, requires_grad False, no adapters attached."""
    tokenizer: PreTrainedTokenizerBase
    """Has a chat template and a pad token."""
    resolved: ResolvedModel
    device: str
    dtype: torch.dtype
    load_seconds: float
    """Seconds this ``get()`` spent (converting and) loading; near 0 on a cache hit."""
    cached: bool
    """True when this ``get()`` did not load."""
    warnings: list[str] = field(default_factory=list)
    nbytes: int = 0
    """Bytes of parameters and buffers (what the cache's memory budget counts)."""
    _shared: _Shared = field(default_factory=_Shared, repr=False, compare=False)

    @property
    def derived(self) -> dict[str, Any]:
        """What users derive from the weights once and keep with them (e.g. training/bf16.py's copies).

        One dict per cache entry, shared by every view of it; it goes when the entry is evicted and
        the last view is dropped. Tensors in it count towards the cache's memory budget.
        """
        return self._shared.derived

    def fingerprint(self) -> str:
        """sha256 of the config and every parameter (name, dtype, shape, bytes); computed once.

        Compute it while no adapter is attached (the cache does not do it eagerly: it costs about
        0.5 s per 100M parameters). ``compute_fingerprint`` always recomputes.
        """
        with self._shared.lock:
            if self._shared.fingerprint is None:
                self._shared.fingerprint = compute_fingerprint(self.model)
            return self._shared.fingerprint

    def total_bytes(self) -> int:
        """``nbytes`` plus what was derived from the weights since (the cache's budget counts both)."""
        return self.nbytes + _tensor_bytes(self._shared.derived)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    numel = getattr(obj, "numel", None)
    return numel() * obj.element_size() if numel is not None and hasattr(obj, "element_size") else 0


def compute_fingerprint(model: PreTrainedModel) -> str:
    import torch

    digest = hashlib.sha256()
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from is not what it is
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        tensor = param.detach()
        digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}".encode())
        flat = tensor.contiguous().reshape(-1).cpu()
        # view as bytes so bf16 (which numpy lacks) hashes like every other dtype
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()
