"""Per architecture: what llama.cpp's converter does to each adapted weight, so a LoRA can follow.

llama.cpp's ``convert_hf_to_gguf.py`` renames every tensor with gguf's tables and, for some
architectures, reorders rows or columns of a weight on the way (``modify_tensors`` of the model's
converter class). A LoRA delta ``B @ A`` added to that weight must be reordered the same way: an
output (row) reordering applies to ``B``'s rows, an input (column) reordering to ``A``'s columns.
llama.cpp then adds the adapter only where its graph multiplies through ``build_lora_mm``; a
module whose GGUF tensor is used any other way (a convolution, a norm) cannot hold a LoRA there.

The rules, read from the converter of llama-cpp-python 0.3.36 (and proven by the round-trip
tests in tests/test_arch_export.py against that llama.cpp):

- llama, mistral (``LlamaModel``): rows of ``q_proj``/``k_proj`` permuted per head (rotary pairs
  neighbouring rows in llama.cpp, the two halves in transformers).
- qwen2, qwen3, gemma3 (``Qwen2Model``, ``Qwen3Model``, ``Gemma3Model``): NEOX rotary, no reordering;
  Gemma's ``+1`` on norm weights touches norms only, never a LoRA target.
- phi3 (``Phi3MiniModel``): fused ``qkv_proj`` (``attn_qkv``) and ``gate_up_proj`` (``ffn_up``)
  kept fused and unchanged; a LoRA on the fused weight is exported as it is.
- qwen3_5 (``Qwen3_5TextModel`` ← ``_LinearAttentionVReorderBase``): in the linear-attention
  (Gated DeltaNet) layers, with fewer key heads than value heads, the value heads go from grouped
  by key head to tiled order: the V rows of ``in_proj_qkv``, the rows of ``in_proj_z``, of
  ``in_proj_b``/``in_proj_a`` (one row per value head) and the columns of ``out_proj``. The gated
  ``q_proj`` of the full-attention layers and the MLP stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

Order = tuple[Optional[Any], Optional[Any]]
"""(row index, column index) into the transformers weight giving the GGUF tensor's order; None: as is."""

DENSE_KINDS = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output"})
"""GGUF tensor kinds llama.cpp multiplies through ``build_lora_mm`` in a dense transformer block."""


@dataclass(frozen=True)
class ArchRule:
    gguf_arch: str
    """The GGUF ``general.architecture`` llama.cpp's converter writes for this model type."""
    lora_kinds: frozenset[str]
    """GGUF tensor kinds (``attn_q`` in ``blk.0.attn_q.weight``) llama.cpp can add a LoRA to."""
    orders: Callable[[dict[str, Any]], dict[str, Order]] = field(default=lambda config: {})
    """The reordering of each tensor kind, from the model's config."""


def _llama_orders(config: dict[str, Any]) -> dict[str, Order]:
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // n_head)
    return {"attn_q": (permute_index(n_head * head_dim, n_head), None),
            "attn_k": (permute_index(n_kv * head_dim, n_kv), None)}


def permute_index(rows: int, n_head: int) -> Any:
    """llama.cpp's Llama q/k row permutation (``LlamaModel.permute``) as an index into the rows."""
    import numpy as np

    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def v_head_index(n_k_heads: int, n_v_per_k: int, head_dim: int) -> Any:
    """Value heads grouped by key head → tiled (``_LinearAttentionVReorderBase._reorder_v_heads``)."""
    import numpy as np

    n = n_k_heads * n_v_per_k * head_dim
    return np.arange(n).reshape(n_k_heads, n_v_per_k, head_dim).transpose(1, 0, 2).reshape(n)


def _qwen35_orders(config: dict[str, Any]) -> dict[str, Order]:
    import numpy as np

    n_k = int(config.get("linear_num_key_heads") or 0)
    n_v = int(config.get("linear_num_value_heads") or 0)
    if n_k <= 0 or n_v <= 0 or n_k == n_v:  # the converter reorders only when they differ
        return {}
    d_k, d_v, per_k = int(config["linear_key_head_dim"]), int(config["linear_value_head_dim"]), n_v // n_k
    qk = 2 * n_k * d_k
    return {
        "attn_qkv": (np.concatenate([np.arange(qk), qk + v_head_index(n_k, per_k, d_v)]), None),
        "attn_gate": (v_head_index(n_k, per_k, d_v), None),
        "ssm_beta": (v_head_index(n_k, per_k, 1), None),
        "ssm_alpha": (v_head_index(n_k, per_k, 1), None),
        "ssm_out": (None, v_head_index(n_k, per_k, d_v)),
    }


_LLAMA = ArchRule("llama", DENSE_KINDS, _llama_orders)
_QWEN35 = ArchRule("qwen35", DENSE_KINDS | {"attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha", "ssm_out"},
                   _qwen35_orders)
_GEMMA3 = ArchRule("gemma3", DENSE_KINDS)

RULES: dict[str, ArchRule] = {
    # transformers model_type (top level or text_config) → rule
    "llama": _LLAMA,
    "mistral": _LLAMA,  # converted by llama.cpp's LlamaModel class, like llama
    "qwen2": ArchRule("qwen2", DENSE_KINDS),
    "qwen3": ArchRule("qwen3", DENSE_KINDS),
    "qwen3_5": _QWEN35,  # the image-text checkpoints; their text_config says qwen3_5_text
    "qwen3_5_text": _QWEN35,
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "phi3": ArchRule("phi3", frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down", "output"})),
}
"""Architectures this exporter writes GGUF LoRA (and merged GGUF) for."""

EXPORTABLE = sorted({k.removesuffix("_text") for k in RULES})
"""Model types listed to clients (``supports``), without transformers' ``_text`` variants."""

LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
"""Where image-text checkpoints (Qwen3.5, Gemma 3) keep the text model's modules."""


def text_module(module: str) -> str:
    """``model.language_model.layers.0.mlp.up_proj`` → ``model.layers.0.mlp.up_proj`` (the names
    gguf's tables and llama.cpp's converter use for the text model of an image-text checkpoint)."""
    for prefix in LANGUAGE_MODEL_PREFIXES:
        if module.startswith(prefix):
            return "model." + module[len(prefix):]
    return module


def tensor_kind(gguf_name: str) -> str:
    """``blk.0.attn_q.weight`` → ``attn_q``; ``output.weight`` → ``output``."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]
