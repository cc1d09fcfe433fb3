"""Fold an adapter into its base as a transformers checkpoint (``merged``); ``merge_gguf`` writes
``merged-gguf`` (and uses ``with_adapter`` for the variants only PEFT merges).

The merge starts from a fresh full-precision (fp32) copy of the base read from its files — never
from a quantized model, and never the warm cached instance (merging changes weights in place) — and
lets PEFT do it (``merge_and_unload``), so DoRA and every other variant PEFT can merge is folded
exactly as PEFT computes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import errors
from .source import AdapterSource, BaseModel

log = logging.getLogger(__name__)

TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _load_base_fp32(base: BaseModel) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": base.hf_gguf_file} if base.hf_gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(base.hf_path, dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise errors.ModelLoadFailed(f"Cannot load base model {base.name!r} from {base.hf_path} in float32: "
                                     f"{type(exc).__name__}: {exc}", name=base.name) from exc
    if base.hf_gguf_file:
        # A model read from a .gguf carries the GGUF quantization_config and refuses save_pretrained;
        # rebuild a plain one with the same (dequantized) weights, as models/embedded.py's _convert_gguf does.
        config_dict = model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise errors.ModelLoadFailed(f"The weights read from {base.hf_gguf_file} do not match its architecture",
                                         missing=missing[:10], unexpected=unexpected[:10])
        plain.generation_config = model.generation_config
        model = plain
    model.eval()
    model.requires_grad_(False)
    return model


def with_adapter(source: AdapterSource, base: BaseModel) -> Any:
    import warnings

    from peft import PeftModel

    model = _load_base_fp32(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return PeftModel.from_pretrained(model, str(source.path), is_trainable=False)
    except Exception as exc:
        raise errors.ModelLoadFailed(f"Adapter {source.path} cannot be applied to {base.name!r}: "
                                     f"{type(exc).__name__}: {exc}", path=str(source.path)) from exc


def write_merged(source: AdapterSource, base: BaseModel, out_dir: Path, out_type: str) -> None:
    """A transformers checkpoint in ``out_dir``: safetensors weights, config, generation config,
    tokenizer and chat template; stock ``from_pretrained`` loads it."""
    import torch

    from ..models import ensure_pad_and_template, save_tokenizer

    peft_model = with_adapter(source, base)
    merged = peft_model.merge_and_unload(safe_merge=True)
    dtype = getattr(torch, TORCH_DTYPES[out_type])
    merged.to(dtype)
    merged.config.dtype = dtype
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer = _tokenizer(source, base)
    ensure_pad_and_template(tokenizer)
    save_tokenizer(tokenizer, out_dir)


def _tokenizer(source: AdapterSource, base: BaseModel) -> Any:
    """The adapter's own tokenizer when it carries one (the sidecar saves it), else the base's."""
    from transformers import AutoTokenizer

    if (source.path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(source.path))
    kwargs = {"gguf_file": base.hf_gguf_file} if base.hf_gguf_file else {}
    return AutoTokenizer.from_pretrained(base.hf_path, **kwargs)
