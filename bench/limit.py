"""The compute limit: measured fp32 matmul throughput, and the FLOP model of one LoRA training token.

FLOP model (stated in the output and in docs/PERFORMANCE.md). For a decoder with frozen base
weights and LoRA adapters, per token fed:

- ``4·N``: N = the parameters of the decoder blocks' linear layers (q, k, v, o, gate, up, down),
  embeddings, norms and the LM head excluded. Forward costs 2·N (one multiply-add per weight);
  backward needs only the gradient with respect to the activations, another 2·N, because the frozen
  weights get no gradient. (Full fine-tuning would add 2·N for weight gradients: the usual 6·N.)
  Embeddings are a table lookup, not a matmul; norms and activations are elementwise.
- plus the LM head, ``4·V·d`` (2·V·d forward, 2·V·d backward to the hidden state; the tied head is
  frozen), at each position where it is computed. The sidecar computes it only at the positions
  whose next token is labelled; the baseline at every position.

This "model FLOP" count is the issue's definition and the one the ≥ 70 % target uses. Reported
beside it, for completeness, is the work it leaves out: the LoRA matmuls (6·r·(in+out) per adapted
layer per token: forward, input gradient and weight gradient) and causal attention
(QKᵀ and AV, forward 2·2·T·d_q/2 per token per layer on average, backward twice that).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config_dir(cls, path: str) -> "ModelShape":
        cfg = json.loads((Path(path) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                   intermediate=cfg["intermediate_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim, vocab=cfg["vocab_size"])

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder block."""
        d, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.projections().values())


def flops_per_token(shape: ModelShape, *, logit_fraction: float) -> float:
    """The issue's model FLOP per fed token: 4·N + 4·V·d × (share of positions with logits)."""
    return 4 * shape.linear_params + 4 * shape.vocab * shape.hidden * logit_fraction


def mixed_bound(shape: ModelShape, *, logit_fraction: float, block_gflops: float, head_gflops: float) -> float:
    """Tokens/s bound when the decoder blocks' matmuls run at ``block_gflops`` (bf16) and the LM head at
    ``head_gflops`` (fp32): the sidecar's bf16-matmul path (sidecar/training/bf16.py) keeps the head in fp32."""
    block = 4 * shape.linear_params / (block_gflops * 1e9)
    head = 4 * shape.vocab * shape.hidden * logit_fraction / (head_gflops * 1e9)
    return 1.0 / (block + head)


def extra_flops(shape: ModelShape, *, rank: int, target_modules: list[str], tokens: int,
                sequence_lengths: list[int]) -> dict[str, float]:
    """Work outside the model-FLOP count, for a run over ``sequence_lengths`` (total ``tokens``)."""
    proj = shape.projections()
    lora = 6 * rank * sum(i + o for name, (i, o) in proj.items() if name in target_modules) * shape.layers * tokens
    dq = shape.heads * shape.head_dim
    # Causal attention: sum over positions t of 2·2·t·d_q forward, ×3 with backward.
    attention = sum(3 * 2 * 2 * dq * (n * (n + 1) / 2) for n in sequence_lengths) * shape.layers
    return {"lora": float(lora), "attention": float(attention)}


def matmul_gflops(threads: int, *, shapes: list[tuple[int, int, int]], repeats: int = 5,
                  min_seconds: float = 0.2, dtype: str = "float32") -> dict[str, Any]:
    """Best-of-``repeats`` ``torch.mm`` GFLOP/s in ``dtype`` for each (M, K, N) in ``shapes``.

    Each repeat runs enough multiplications to last ``min_seconds``, so timer resolution does not
    matter; the best repeat is kept because other load can only slow a repeat down.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        dt = getattr(torch, dtype)
        for m, k, n in shapes:
            a = torch.randn(m, k).to(dt)
            b = torch.randn(k, n).to(dt)
            out = torch.empty(m, n, dtype=dt)
            for _ in range(3):
                torch.mm(a, b, out=out)
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            one = max(time.perf_counter() - t0, 1e-6)
            iters = max(1, int(min_seconds / one))
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch.mm(a, b, out=out)
                best = min(best, (time.perf_counter() - t0) / iters)
            results.append({"m": m, "k": k, "n": n, "gflops": 2 * m * k * n / best / 1e9})
    finally:
        torch.set_num_threads(previous)
    peak = max(results, key=lambda r: r["gflops"])
    return {"threads": threads, "dtype": dtype, "shapes": results, "peak_gflops": peak["gflops"],
            "peak_shape": [peak["m"], peak["k"], peak["n"]]}


def representative_shapes(shape: ModelShape, rows: list[int]) -> list[tuple[int, int, int]]:
    """Forward (x·Wᵀ) and backward (grad·W) products of the block's linear layers and the LM head,
    for ``rows`` = tokens in a micro-batch."""
    seen: list[tuple[int, int, int]] = []
    for m in rows:
        for i, o in shape.projections().values():
            for mk in ((m, i, o), (m, o, i)):
                if mk not in seen:
                    seen.append(mk)
        seen.append((m, shape.hidden, shape.vocab))
        seen.append((m, shape.vocab, shape.hidden))
    return seen


def describe(shape: ModelShape) -> dict[str, Any]:
    return {**asdict(shape), "linear_params_N": shape.linear_params,
            "lm_head_params": shape.vocab * shape.hidden}
