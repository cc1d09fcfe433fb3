"""bf16 matmuls over an fp32 model, for training on CPUs with native bf16 (AVX512_BF16 or AMX).

What changes: every frozen ``nn.Linear`` of the decoder (the base side of each adapted projection,
and the projections left unadapted) multiplies in bf16: its input is rounded to bf16, multiplied by
a bf16 copy of its weight (fp32 accumulation inside oneDNN), and the product is returned as fp32.
An adapted projection runs its base product and LoRA branch together (fastlora.LoraLinearBf16,
which says which of the branch's products are bf16). What stays fp32: the model's own weights (the
bf16 copies sit beside them), the residual stream, norms, attention, the LoRA weights and their
gradients, AdamW's state, the LM head and the loss. That is autocast's rule for linear layers, without autocast's cost: autocast re-casts
a frozen weight on every call (its cast cache keeps only leaves that require grad), which measured
slower than plain fp32 here; the copies below are made once per base model and kept with it in the
model cache, so a warm job pays nothing for them.

When: ``dtype: "auto"`` on a CPU whose instruction set has native bf16 dot products (detected at run
time), a single-process job on an fp32, unquantized base. ``dtype: "float32"`` keeps every matmul in
fp32 (the exact path), and CPUs without native bf16 never take this one. The speed and the adapter's
quality at equal tokens are measured in docs/PERFORMANCE.md ("bf16 matmuls").
"""

from __future__ import annotations

import contextlib
import types
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..models import cpu_has_native_bf16

if TYPE_CHECKING:
    from ..models import LoadedModel


def kept_weights(loaded: LoadedModel) -> dict[str, Any]:
    """Where the bf16 weight copies of ``loaded``'s base model are kept: its cache entry's ``derived``
    dict, shared by every view of that entry and freed with it when the cache evicts the model (the
    cache's memory budget counts the copies)."""
    return loaded.derived


def wanted(requested_dtype: str | None, device: str, weights_dtype: torch.dtype, quantized: bool,
           world_size: int) -> bool:
    """Whether a training job takes bf16 matmuls (see the module doc for the rule)."""
    return ((requested_dtype or "auto").lower() == "auto" and device == "cpu" and weights_dtype == torch.float32
            and not quantized and world_size == 1 and cpu_has_native_bf16())


class _Bf16Linear(torch.autograd.Function):
    """``linear(x.bf16(), w16).float()`` (+ fp32 bias). The weight is frozen: only x gets a gradient,
    ``grad.bf16() @ w16`` in fp32. Nothing but the shared bf16 weight is kept for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w16)
        y = torch.nn.functional.linear(x.to(torch.bfloat16), w16).to(x.dtype)
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (w16,) = ctx.saved_tensors
        grad_x = (grad.to(torch.bfloat16) @ w16).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or x.dtype != torch.float32:  # not a frozen fp32 layer any more
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return _Bf16Linear.apply(x, self._bf16_weight, self.bias)


def _frozen_linears(lm: Any) -> list[tuple[str, torch.nn.Linear]]:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return [(name, m) for name, m in lm.named_modules()
            if type(m) is torch.nn.Linear and m is not head and m.weight.dtype == torch.float32
            and not m.weight.requires_grad]


def weight_copies(lm: Any, store: dict[str, Any]) -> list[tuple[torch.nn.Linear, torch.Tensor]]:
    """Each frozen linear layer of ``lm`` with the bf16 copy of its weight, made once per base model and
    kept in ``store`` (``kept_weights(loaded)``: the cache entry's shared state); a weight changed in
    place since (its version counter moved) is copied again. Keyed by the module's id: the Linear
    objects stay the same while peft wraps them."""
    modules = [module for _, module in _frozen_linears(lm)]
    return list(zip(modules, _copies(modules, store)))


def _copies(modules: list[torch.nn.Linear], store: dict[str, Any]) -> list[torch.Tensor]:
    """The bf16 copies of ``modules``' weights, from ``store`` or made now. The store's dict is replaced
    whole, never changed in place, so that ``status`` may count its bytes from another thread."""
    copies: dict[int, tuple[int, torch.Tensor]] = dict(store.get("bf16_weights") or {})
    out = []
    for module in modules:
        w = module.weight
        have = copies.get(id(module))
        if have is None or have[0] != w._version:
            have = (w._version, w.detach().to(torch.bfloat16))
            copies[id(module)] = have
        out.append(have[1])
    store["bf16_weights"] = copies
    return out


class _Patch:
    """One ``bf16_matmuls`` in effect: the layers it routes and the store their copies are kept in."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store
        self.modules: list[torch.nn.Linear] = []
        self.released = False


_ACTIVE: list[_Patch] = []
"""The ``bf16_matmuls`` in effect in this process (a job's thread enters and leaves them; a pause
with ``release`` drops and rebuilds their copies on that same thread)."""


def release_copies() -> int:
    """``pause {release}``: drop the bf16 weight copies of every patch in effect — the layers' references
    and the model cache's — so that their memory can go back to the OS; returns their bytes. The job is
    parked at a pause point then (no forward pass, no autograd graph holds a copy)."""
    freed = 0
    for patch in _ACTIVE:
        if patch.released:
            continue
        copies = patch.store.pop("bf16_weights", None) or {}
        freed += sum(t.numel() * t.element_size() for _, t in copies.values())
        for module in patch.modules:
            module._bf16_weight = None
        patch.released = True
    return freed


def rebuild_copies() -> int:
    """After a released pause, before the job goes on: the copies made again from the fp32 weights
    (the same rounding, so the job computes exactly what it would have); returns how many."""
    count = 0
    for patch in _ACTIVE:
        if not patch.released:
            continue
        for module, w16 in zip(patch.modules, _copies(patch.modules, patch.store)):
            module._bf16_weight = w16
            count += 1
        patch.released = False
    return count


@contextlib.contextmanager
def bf16_matmuls(lm: Any, store: dict[str, Any]) -> Iterator[int]:
    """Route the frozen linear layers of ``lm`` through bf16 matmuls for the duration; yields their count.

    The patch is an instance attribute on each layer, removed on the way out, whatever happened.
    """
    patch = _Patch(store)
    try:
        for module, w16 in weight_copies(lm, store):
            module._bf16_weight = w16
            module.forward = types.MethodType(_forward, module)
            patch.modules.append(module)
        _ACTIVE.append(patch)
        yield len(patch.modules)
    finally:
        if patch in _ACTIVE:
            _ACTIVE.remove(patch)
        for module in patch.modules:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_bf16_weight", None)
