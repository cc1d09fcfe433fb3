"""A PEFT LoRA as a llama.cpp GGUF LoRA file.

What llama.cpp reads (src/llama-adapter.cpp, llama-graph.cpp ``build_lora_mm``):

- KV ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32), and
  ``general.architecture`` equal to the base model's;
- for each adapted weight ``W`` named ``blk.N.attn_q.weight`` in the base file, the tensors
  ``blk.N.attn_q.weight.lora_a`` (ggml ne = [in, rank], i.e. PEFT's lora_A as stored) and
  ``….lora_b`` (ne = [rank, out], PEFT's lora_B as stored);
- it adds ``user_scale · alpha / rank · B (A x)``, with ONE alpha for the whole file and ``rank``
  read from each tensor's shape.

PEFT's scale is per module (``rank_pattern``/``alpha_pattern``) and alpha/√r with rsLoRA, so the
file's alpha is chosen as the config's own scale × rank (plain LoRA: exactly ``lora_alpha``, the
value llama.cpp's converter writes) and whatever a module's scale differs by is folded into its
``B``: llama.cpp's ``alpha / rank`` then equals PEFT's scale for every module. Where llama.cpp's
converter reorders a weight (``gguf_arch``), B's rows and A's columns follow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .fit import module_scale
from .gguf_layout import GgufLayout, encode, file_type
from .source import LoraPair


def file_alpha(config: dict[str, Any]) -> float:
    """The file's ``adapter.lora.alpha``: the config's default scale × rank, as float32."""
    import numpy as np

    rank, _, scale = module_scale(config, "\0")  # no pattern matches: the config's defaults
    return float(np.float32(scale * rank))


def b_factor(pair: LoraPair, alpha: float) -> float:
    """What to multiply the module's B by so that llama.cpp's alpha/rank equals PEFT's scale."""
    if alpha <= 0:  # llama.cpp then applies the user scale alone
        return pair.scale
    return pair.scale * pair.rank / alpha


def write(pairs: Iterable[LoraPair], layout: GgufLayout, path: Path, *, alpha: float, out_type: str,
          name: str) -> int:
    """Write the GGUF LoRA file at ``path``; return the number of adapted weights."""
    import gguf

    writer = gguf.GGUFWriter(str(path), layout.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    count = 0
    for pair in pairs:
        target = layout.tensor_name(pair.module)
        if target is None:  # preflight maps every module first; this is a programming error
            raise ValueError(f"no GGUF name for {pair.module}")
        a, b = layout.factors_to_gguf(target, pair.a, pair.b * b_factor(pair, alpha))
        for suffix, array in ((".lora_a", a), (".lora_b", b)):
            data, kind = encode(array, out_type)
            writer.add_tensor(target + suffix, data, raw_dtype=kind)
        count += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return count
