"""A fused LoRA branch for training: ``dropout(x) @ Aᵀ @ Bᵀ · scaling`` as one autograd function.

Why not peft's own ``lora_B(lora_A(lora_dropout(x)))``: measured on SmolLM2-135M, 2 CPU threads,
r 8 on the 7 projections, batch 4 × 128 tokens, fp32 (docs/PERFORMANCE.md has the table):

- ``F.dropout`` draws its mask with ``bernoulli_``, ~5 ns per element on this CPU; over the inputs
  of 210 adapted layers that was 16 % of the whole training step. Here the mask comes from 64-bit
  words of the same generator, cut into four 16-bit lanes (the top one has 15 random bits), several
  times cheaper, with the dropout probability exact to 1/65536 (1/32768 in the top lane).
- autograd kept a float copy of ``dropout(x)`` for every adapted layer (for A's gradient), next to
  the ``x`` the frozen base layer already keeps. Here only a 1-byte mask and the rank-r
  intermediate are kept; ``dropout(x)`` is recomputed in the backward pass from the shared ``x``.

The maths is unchanged (same forward, same gradients up to float rounding), which the tests check
against peft's path. With bf16 matmuls on (training/bf16.py), ``LoraLinearBf16`` computes a layer's
frozen base product and its LoRA branch together, sharing one bf16 copy of the input. Only plain (non-DoRA) ``peft.tuners.lora.Linear`` layers in training are
patched; everything else keeps peft's code. The patch lives on the LoRA modules themselves, so it
disappears with them when the adapter is unloaded.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import torch


# Per-lane thresholds of ``keep_mask``: a word from ``random_()`` is uniform on [0, 2**63), so viewed as
# four int16 lanes, the three low ones are uniform over int16 and the top one over [0, 2**15).
_TOP_LANE = 3 if sys.byteorder == "little" else 0


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask, each element kept with probability ``1 - p`` (p rounded to 1/65536; to 1/32768 in
    every fourth element)."""
    n = math.prod(shape)
    # Four draws per 64-bit word, compared lane by lane against a broadcast threshold row: a contiguous
    # comparison (cutting the words into three 16-bit draws, as before, made it a strided one that cost
    # as much as the generator itself).
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = words.view(torch.int16).view(-1, 4)
    thresholds = [round(p * 65536) - 32768] * 4
    thresholds[_TOP_LANE] = round(p * 32768)
    return (lanes >= torch.tensor(thresholds, dtype=torch.int16, device=device)).view(-1)[:n].view(shape)


class LoraBranch(torch.autograd.Function):
    """``(dropout(x) @ Aᵀ) @ Bᵀ · scaling``. The 1/(1-p) of inverted dropout and the LoRA scaling are
    applied to the rank-r intermediate rather than to full-width tensors (same result, fewer passes
    over memory), and the mask is applied with ``torch.where`` (measured 6× faster here than
    multiplying by a bool tensor)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                p: float) -> torch.Tensor:
        mask = keep_mask(x.shape, p, x.device) if p > 0 else None
        keep_scale = 1.0 / (1.0 - p)
        xd = torch.where(mask, x, 0.0) if mask is not None else x
        # Both scalars are applied to the rank-r intermediate, never to a full-width tensor.
        h = (xd @ a.t()) * (keep_scale * scaling)
        del xd
        ctx.save_for_backward(x, mask, h, a, b)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return h @ b.t()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, mask, h, a, b = ctx.saved_tensors
        grad_b = None
        if ctx.needs_input_grad[2]:  # h already carries scaling
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        grad_h = (grad_out @ b) * (ctx.keep_scale * ctx.scaling)  # w.r.t. dropout(x) @ Aᵀ without 1/(1-p)
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            xd = torch.where(mask, x, 0.0) if mask is not None else x
            grad_a = grad_h.reshape(-1, grad_h.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])
            del xd
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a
            if mask is not None:
                grad_x = torch.where(mask, grad_x, 0.0)
        return grad_x, grad_a, grad_b, None, None


class LoraLinearBf16(torch.autograd.Function):
    """A frozen fp32 linear layer and its LoRA branch in one, with bf16 matmuls (training/bf16.py):
    ``linear(x, W) + (dropout(x) @ Aᵀ) @ Bᵀ · scaling``. x is rounded to bf16 once and shared by the
    base product (against W's kept bf16 copy) and the A product; in the backward pass the incoming
    gradient is rounded to bf16 once and shared by the three products that read it. Every product
    accumulates in fp32 inside oneDNN.

    What stays fp32: the B product and the output sum, and the sum of the two input gradients. The
    adapter's contribution is small next to the base output (B starts at 0), and a bf16 sum would
    round most of it away: measured, summing in bf16 left the scored adapter as good but the logged
    training loss 0.02–0.09 nat too high. The A and B gradients are returned in fp32 (the weights,
    AdamW's state and the loss are fp32). Saves ``dropout(x)`` in bf16 (half the bytes of the fp32 x
    the separate path keeps), the 1-byte mask and the rank-r intermediate."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        bf16 = torch.bfloat16
        x16 = x.to(bf16)
        mask = keep_mask(x.shape, p, x.device) if p > 0 else None
        keep_scale = 1.0 / (1.0 - p)
        xd16 = torch.where(mask, x16, 0.0) if mask is not None else x16
        y = torch.nn.functional.linear(x16, w16).to(x.dtype)
        del x16
        if bias is not None:
            y += bias
        # Both scalars on the rank-r intermediate, never on a full-width tensor.
        h = (xd16 @ a.to(bf16).t()).to(x.dtype) * (keep_scale * scaling)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t())
        # The backward pass needs x only as dropout(x) (for A's gradient): keep that, in bf16.
        ctx.save_for_backward(xd16, mask, h, w16, a, b)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        bf16 = torch.bfloat16
        xd16, mask, h, w16, a, b = ctx.saved_tensors
        g16 = grad_out.to(bf16)
        grad_b = grad_a = grad_x = None
        if ctx.needs_input_grad[4]:  # h already carries the scaling
            grad_b = (g16.reshape(-1, g16.shape[-1]).t() @ h.reshape(-1, h.shape[-1]).to(bf16)).to(b.dtype)
        grad_h16 = (g16 @ b.to(bf16)) * (ctx.keep_scale * ctx.scaling)  # w.r.t. dropout(x) @ Aᵀ
        if ctx.needs_input_grad[3]:
            grad_a = (grad_h16.reshape(-1, grad_h16.shape[-1]).t() @ xd16.reshape(-1, xd16.shape[-1])).to(a.dtype)
        if ctx.needs_input_grad[0]:
            lora = grad_h16 @ a.to(bf16)
            if mask is not None:
                lora = torch.where(mask, lora, 0.0)
            grad_x = (g16 @ w16).to(grad_out.dtype)
            grad_x += lora
        return grad_x, None, None, grad_a, grad_b, None, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement for peft's ``lora.Linear.forward`` in training mode (falls back otherwise)."""
    if (not self.training or self.disable_adapters or self.merged or args or kwargs
            or len(self.active_adapters) != 1):
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A or name in self.lora_variant:  # DoRA and other variants: peft's path
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    base = self.base_layer
    w16 = getattr(base, "_bf16_weight", None)  # set while training/bf16.py's matmuls are on
    if (w16 is not None and type(base) is torch.nn.Linear and not base.weight.requires_grad
            and x.dtype == a.dtype == torch.float32):
        return LoraLinearBf16.apply(x, w16, base.bias, a, b, self.scaling[name], p)
    result = base(x)
    x = x.to(a.dtype)
    return result + LoraBranch.apply(x, a, b, self.scaling[name], p).to(result.dtype)


def patch(peft_model: Any) -> int:
    """Route every plain LoRA Linear layer of ``peft_model`` through ``LoraBranch``; returns the count."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear and not module.lora_variant:
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
