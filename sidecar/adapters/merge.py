"""Fold an adapter into its base: a transformers checkpoint (``merged``) or a GGUF model (``merged-gguf``).

Both start from a fresh full-precision (fp32) copy of the base read from its files — never from
a quantized model, and never the warm cached instance (merging changes weights in place) — and
let PEFT do the merge (``merge``/``merge_and_unload``), so DoRA and every other variant PEFT can
merge is folded exactly as PEFT computes it.

``merged-gguf`` keeps the base file's metadata and tokenizer and every tensor the adapter does not
touch byte for byte; each adapted weight becomes ``dequantized base + (merged − base)`` in the
file's layout, encoded with gguf's own quantizers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import errors
from .fit import PEFT_PREFIX
from .gguf_layout import GgufLayout, choose_qtype, encode, encoded_nbytes, file_type
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


def _with_adapter(source: AdapterSource, base: BaseModel) -> Any:
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

    peft_model = _with_adapter(source, base)
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


def write_merged_gguf(source: AdapterSource, base: BaseModel, layout: GgufLayout, out_path: Path,
                      out_type: str) -> int:
    """A full GGUF model at ``out_path`` (see the module docstring); returns how many weights changed."""
    import gguf
    import numpy as np
    from peft.tuners.lora import LoraLayer

    assert base.gguf_path is not None
    peft_model = _with_adapter(source, base)
    layers: dict[str, Any] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            target = layout.tensor_name(name.removeprefix(PEFT_PREFIX))
            if target is None:
                raise errors.ExportRefused(f"Cannot export to merged-gguf: no GGUF tensor for {name}",
                                           format="merged-gguf", reason="unmapped", module=name)
            layers[target] = module

    reader = gguf.GGUFReader(str(base.gguf_path))
    writer = gguf.GGUFWriter(str(out_path), layout.arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE,
                                                            gguf.Keys.General.FILE_TYPE):
            continue  # virtual fields, and the two the writer sets itself
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub_type=sub)
    writer.add_file_type(file_type(out_type))

    missing = sorted(set(layers) - {t.name for t in reader.tensors})
    if missing:
        raise errors.ExportRefused(f"Cannot export to merged-gguf: the base file has no {', '.join(missing[:5])}; "
                                   "is it the adapter's base model?", format="merged-gguf", reason="base-mismatch")
    kinds: dict[str, Any] = {}
    for tensor in reader.tensors:
        if tensor.name in layers:
            shape = tuple(int(x) for x in reversed(tensor.shape))  # (out, in)
            kind = choose_qtype(shape, out_type)
            kinds[tensor.name] = kind
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), encoded_nbytes(shape, kind), kind)
        else:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for tensor in reader.tensors:
            module = layers.get(tensor.name)
            if module is None:
                writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
                continue
            weight = module.get_base_layer().weight
            before = weight.detach().clone()
            module.merge(safe_merge=True)
            delta = (weight.detach() - before).numpy()
            stored = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(delta.shape)
            data, kind = encode(stored + layout.delta_to_gguf(tensor.name, delta), out_type)
            assert kind == kinds[tensor.name]
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return len(layers)
