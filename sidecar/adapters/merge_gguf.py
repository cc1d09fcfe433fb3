"""``merged-gguf``: an adapter folded into a GGUF model file, without transformers reading that file.

The real use: an adapter trained on a model's Hugging Face checkpoint, folded into the GGUF the
application's llama.cpp serves (``baseModel: "/path/model.gguf"``; the served GGUF and the trained
checkpoint must be the same model). transformers cannot read the GGUF files of every architecture
(Qwen3.5, Gemma 3, Phi-3 among them), so nothing here asks it to:

- the base's config (the layout: tensor names, reorderings) is read from the checkpoint the adapter
  was trained on (``trained_checkpoint``: its manifest / adapter config), which also lets
  ``check_against_base`` prove on real weights that the GGUF holds that model in the assumed order;
  only without one is the config read from the GGUF through transformers;
- a plain LoRA's delta is its factors: ``scale · B @ A``, with the per-module scale the adapter
  reader computed (rsLoRA, ``rank_pattern``, ``alpha_pattern``: ``fit.module_scale``, the same one
  the ``gguf-lora`` export folds), put in the file's row/column order by the layout;
- an adapter with a variant PEFT merges its own way (DoRA's magnitudes, …) is merged by PEFT on a
  full-precision base (the trained checkpoint, else the GGUF read by transformers), and refused
  clearly when there is neither.

The file keeps the base's metadata and tokenizer and every tensor the adapter does not touch byte
for byte; each adapted weight becomes ``dequantized base + delta``, encoded with gguf's quantizers.
The out types gguf has no encoder for (``q4_0``, ``q4_k_m``, ``q5_k_m``, ``q6_k``) are made by
llama.cpp's own quantizer from an unquantized intermediate (``write_quantized``; see ``quantize``).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from .. import errors
from . import quantize
from .gguf_layout import GgufLayout, choose_qtype, encode, encoded_nbytes, file_type, read_config
from .source import AdapterSource, BaseModel, resolve_base

Delta = Callable[[], Any]
"""Computes one adapted weight's delta, (out, in) float32 in the GGUF file's order, when written."""


def trained_checkpoint(source: AdapterSource, base: BaseModel) -> Optional[BaseModel]:
    """For a ``.gguf`` base given in place of the adapter's own: the transformers checkpoint the adapter
    was trained on (its manifest, else its adapter config), when that resolves to one; else None."""
    if base.hf_gguf_file is None:
        return None
    try:
        recorded = resolve_base(source)
    except errors.ModelNotFound:
        return None
    return recorded if recorded.hf_gguf_file is None else None


def gguf_base_config(source: AdapterSource, base: BaseModel, fmt: str) -> tuple[dict[str, Any], Optional[str]]:
    """(the config laying out a GGUF export, the checkpoint directory to check the base file against).

    For a ``.gguf`` base the config comes from the adapter's trained checkpoint when there is one;
    otherwise transformers must read it from the file, and an ExportRefused says what to do when it cannot.
    """
    if base.hf_gguf_file is None:
        return read_config(base), base.hf_path
    checkpoint = trained_checkpoint(source, base)
    if checkpoint is not None:
        return read_config(checkpoint), checkpoint.hf_path
    try:
        return read_config(base), None
    except errors.ModelLoadFailed as exc:
        recorded = ((source.manifest or {}).get("baseModel") or {}).get("name") or \
            source.config.get("base_model_name_or_path") or "—"
        raise errors.ExportRefused(
            f"Cannot export to {fmt}: transformers cannot read the model config of {base.gguf_path} and the "
            f"checkpoint the adapter was trained on (recorded: {recorded!r}) cannot be found to read it from. "
            "Make that Hugging Face checkpoint available where the adapter's manifest / adapter_config.json "
            "says (it must be the model the GGUF was converted from).", format=fmt, reason="base-config",
            detail=exc.message) from exc


def variants(config: dict[str, Any]) -> list[str]:
    """The LoRA variants PEFT would apply for this adapter config (DoRA, …): PEFT's own list of them
    (``LoraConfig`` fields marked as variants, and variant values of ``init_lora_weights``)."""
    from peft import LoraConfig

    found = []
    for spec in dataclasses.fields(LoraConfig):
        value = config.get(spec.name)
        if spec.name == "init_lora_weights":
            found += [v for v in spec.metadata.get("lora_variants", ()) if value == v]
        elif spec.metadata.get("is_lora_variant") and value:
            found.append(spec.name)
    return found


def factor_deltas(source: AdapterSource, layout: GgufLayout) -> dict[str, Delta]:
    """GGUF tensor → its delta ``scale · B @ A`` (the scale PEFT gives the module), in the file's order."""
    import numpy as np

    def delta(pair: Any, name: str) -> Delta:
        return lambda: layout.delta_to_gguf(name, np.float32(pair.scale) * (pair.b @ pair.a))

    deltas: dict[str, Delta] = {}
    for pair in source.pairs:
        name = layout.tensor_name(pair.module)
        if name is None:  # preflight maps every module first; this is a programming error
            raise ValueError(f"no GGUF name for {pair.module}")
        deltas[name] = delta(pair, name)
    return deltas


def peft_deltas(source: AdapterSource, base: BaseModel, checkpoint: Optional[BaseModel], layout: GgufLayout,
                why: list[str]) -> dict[str, Delta]:
    """GGUF tensor → its delta as PEFT merges it (``merge(safe_merge=True)``), on an fp32 copy of the
    trained checkpoint, else of the GGUF read by transformers (refused when it cannot read it)."""
    from peft.tuners.lora import LoraLayer

    from .fit import PEFT_PREFIX
    from .merge import with_adapter

    try:
        peft_model = with_adapter(source, checkpoint or base)
    except errors.ModelLoadFailed as exc:
        if checkpoint is not None:
            raise
        raise errors.ExportRefused(
            f"Cannot export to merged-gguf: the adapter uses {', '.join(why)}, which only PEFT merges (it needs the "
            f"base weights), and transformers cannot read {base.gguf_path}; the checkpoint the adapter was trained "
            "on was not found to merge on instead. Make that checkpoint available where the adapter's manifest "
            "says, or export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py.",
            format="merged-gguf", reason="variant-needs-checkpoint", variants=why, detail=exc.message) from exc

    def delta(module: Any, name: str) -> Delta:
        def compute() -> Any:
            weight = module.get_base_layer().weight
            before = weight.detach().clone()
            module.merge(safe_merge=True)
            return layout.delta_to_gguf(name, (weight.detach() - before).numpy())
        return compute

    deltas: dict[str, Delta] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            target = layout.tensor_name(name.removeprefix(PEFT_PREFIX))
            if target is None:
                raise errors.ExportRefused(f"Cannot export to merged-gguf: no GGUF tensor for {name}",
                                           format="merged-gguf", reason="unmapped", module=name)
            deltas[target] = delta(module, target)
    return deltas


def write_merged_gguf(source: AdapterSource, base: BaseModel, layout: GgufLayout, out_path: Path,
                      out_type: str) -> int:
    """A full GGUF model at ``out_path`` (see the module docstring); returns how many weights changed."""
    assert base.gguf_path is not None
    why = variants(source.config)
    deltas = (peft_deltas(source, base, trained_checkpoint(source, base), layout, why) if why
              else factor_deltas(source, layout))
    if out_type in quantize.OUT_TYPES:
        return write_quantized(base.gguf_path, layout, deltas, out_path, out_type)
    return write_with_deltas(base.gguf_path, layout, deltas, out_path, out_type)


INTERMEDIATE = "f16"
"""The encoding of the unquantized intermediate a llama.cpp quantization starts from: f16, as in
llama.cpp's own convert-then-quantize flow, at half the disk of f32. On the embedded SmolLM2 (Q4_1)
the q4_0 / q4_k_m files made from an f16 and an f32 intermediate are equally far from the base
(mean |Δ log-prob| 0.857 / 0.329 nat against 0.845 / 0.330) and took the same time."""


def write_quantized(base_gguf: Path, layout: GgufLayout, deltas: dict[str, Delta], out_path: Path, out_type: str,
                    threads: Optional[int] = None) -> int:
    """The merge quantized by llama.cpp as ``out_type`` (``quantize.OUT_TYPES``) at ``out_path``: written
    first beside it with every tensor unquantized (``write_with_deltas(..., dequantize=True)``), then
    quantized from there; the intermediate is removed whatever happens. ``threads``: llama.cpp's
    threads (default: the sidecar's thread setting, ``LORA_SIDECAR_THREADS``, as torch applies it)."""
    if threads is None:
        import torch

        from ..models import apply_thread_setting

        apply_thread_setting()
        threads = torch.get_num_threads()
    intermediate = out_path.with_name(f"{out_path.name}.{INTERMEDIATE}-{uuid.uuid4().hex[:8]}")
    try:
        changed = write_with_deltas(base_gguf, layout, deltas, intermediate, INTERMEDIATE, dequantize=True)
        quantize.quantize(intermediate, out_path, out_type, threads)
    finally:
        intermediate.unlink(missing_ok=True)
    return changed


def write_with_deltas(base_gguf: Path, layout: GgufLayout, deltas: dict[str, Delta], out_path: Path,
                      out_type: str, *, dequantize: bool = False) -> int:
    """``base_gguf`` copied to ``out_path`` with each tensor in ``deltas`` replaced by base + delta,
    encoded as ``out_type``; every other tensor and all metadata as they are. ``dequantize``: the
    other tensors that are block-quantized (Q4_1, Q8_0, …) are written dequantized, as ``out_type``."""
    import gguf
    import numpy as np

    def unquantized(kind: Any) -> bool:
        return gguf.GGML_QUANT_SIZES[kind][0] == 1  # F32, F16, BF16 and the integer types

    reader = gguf.GGUFReader(str(base_gguf))
    missing = sorted(set(deltas) - {t.name for t in reader.tensors})
    if missing:
        raise errors.ExportRefused(f"Cannot export to merged-gguf: the base file has no {', '.join(missing[:5])}; "
                                   "is it the adapter's base model?", format="merged-gguf", reason="base-mismatch")
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

    kinds: dict[str, Any] = {}
    changed = set(deltas) | ({t.name for t in reader.tensors if not unquantized(t.tensor_type)} if dequantize
                             else set())
    for tensor in reader.tensors:
        if tensor.name in changed:
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
            if tensor.name not in changed:
                writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
                continue
            shape = tuple(int(x) for x in reversed(tensor.shape))  # (out, in)
            stored = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            delta = deltas.get(tensor.name)
            if delta is not None:
                stored = stored + delta()
            data, kind = encode(stored, out_type)
            assert kind == kinds[tensor.name]
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return len(deltas)
