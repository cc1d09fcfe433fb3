"""The default ``targetModules``: every linear projection inside the transformer blocks, per architecture.

``DEFAULT_TARGETS`` names them for the architectures the sidecar is tested on (keyed by the
``model_type`` of the config the loaded model carries: a Qwen3.5 or Gemma 3 checkpoint loaded as a
text model has ``qwen3_5_text`` / ``gemma3_text``). ``supports`` reports the table and
docs/PROTOCOL.md documents it. For any other architecture the default is found in the model: the
leaf names of every ``nn.Linear`` (or GPT-2 style ``Conv1D``) inside its decoder layers, which leaves
out the LM head, the embeddings and anything beside the decoder (a vision tower). Parameters that are
not a linear layer's weight are never targeted: Qwen3.5's depthwise ``conv1d``, ``A_log`` and
``dt_bias``, and every norm.

Imports no torch at module level: ``supports`` reads the table at the door.
"""

from __future__ import annotations

from typing import Any

from .. import errors

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Qwen3.5's Gated DeltaNet blocks (linear attention): the fused q/k/v input projection, the output
# gate's z, the per-head beta (b) and decay (a) inputs, and the output projection.
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# Phi-3 keeps q/k/v and gate/up fused in one projection each (and llama.cpp keeps them fused).
PHI3 = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ATTENTION + MLP,
    "mistral": ATTENTION + MLP,
    "qwen2": ATTENTION + MLP,
    "qwen3": ATTENTION + MLP,
    "gemma3": ATTENTION + MLP,
    "gemma3_text": ATTENTION + MLP,
    "phi3": PHI3,
    "qwen3_5": LINEAR_ATTENTION + ATTENTION + MLP,
    "qwen3_5_text": LINEAR_ATTENTION + ATTENTION + MLP,
}
"""model_type -> the leaf names of the linear projections in its decoder layers, in block order."""


def table() -> dict[str, list[str]]:
    """``DEFAULT_TARGETS`` as the wire carries it (``supports``)."""
    return {arch: list(names) for arch, names in DEFAULT_TARGETS.items()}


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of the model's decoder layers: ``get_decoder().layers`` where the model
    says which its decoder is (a multimodal model: its language model, not its vision tower), else
    the largest ``nn.ModuleList``. None when there is none."""
    import torch.nn as nn

    decoder = None
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    except Exception:  # noqa: BLE001 - some remote-code models implement it half
        decoder = None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return layers
    return max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)


def linear_leaves(model: Any) -> list[str]:
    """Leaf names of every linear layer inside the decoder layers, in first-seen order."""
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style projections
        linear_types: tuple[type, ...] = (nn.Linear, Conv1D)
    except ImportError:
        linear_types = (nn.Linear,)
    layers = decoder_layers(model)
    if layers is None:
        raise errors.TrainingFailed("Cannot find the transformer blocks of this model; pass targetModules")
    names: dict[str, None] = {}
    for name, module in layers.named_modules():
        if isinstance(module, linear_types) and name:
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def default_targets(model: Any) -> list[str]:
    """The default ``targetModules`` for ``model`` (a transformers model, adapters not attached).

    A known architecture gets its ``DEFAULT_TARGETS`` entry, less any name its blocks lack (a
    Qwen3.5 config whose layers are all full attention has no linear-attention projections) and
    plus any linear layer its blocks have beyond the table (a later variant's new projection:
    "every linear projection" stays true). Any other architecture gets what ``linear_leaves``
    finds.
    """
    found = linear_leaves(model)
    if not found:
        raise errors.TrainingFailed("No linear layers found in the transformer blocks; pass targetModules")
    known = DEFAULT_TARGETS.get(getattr(getattr(model, "config", None), "model_type", None) or "")
    if known is None:
        return found
    present = set(found)
    return [n for n in known if n in present] + [n for n in found if n not in known]
