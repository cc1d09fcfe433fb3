"""Disk space for an export, checked in preflight: the bytes the export holds on disk at its peak,
against what the target's file system has free. A refusal (``-32030`` reason ``disk-space``) comes
before anything is written; the alternative is a merge that fills the disk the user's other programs
write to (a quantized merge of a 7B base first writes a 14 GB f16 intermediate) and then fails.

What is counted (bytes):

- ``gguf-lora``: every A and B in ``outType`` (the same ggml type rule as the writer), plus slack;
- ``merged``: the base checkpoint's tensors (read from its safetensors headers) in ``outType``, plus
  its other files (tokenizer, config);
- ``merged-gguf`` in f32 / f16 / bf16 / q8_0: the base file with each adapted tensor re-encoded, as
  ``merge_gguf.write_with_deltas`` lays it out (exact up to alignment);
- ``merged-gguf`` in llama.cpp's types: the f16 intermediate (every block-quantized tensor
  dequantized, exact as above) and the quantized output side by side, the output at the type's
  nominal bits per weight (``NOMINAL_BPW``; llama.cpp keeps some tensors at a higher type, so the
  real file can be somewhat larger: the slack and the intermediate's size cover that in practice).

Where the figure cannot be had (a base checkpoint without safetensors files) nothing is checked.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Optional

from .. import errors
from . import quantize
from .source import AdapterSource, BaseModel

log = logging.getLogger(__name__)

SLACK = 16 * 2**20
"""Headers, metadata, alignment and small files no estimate counts."""

NOMINAL_BPW = {"q4_0": 4.5, "q4_k_m": 4.9, "q5_k_m": 5.7, "q6_k": 6.6}
"""Bits per weight of llama.cpp's quantized types (its own figures for 7B models, rounded up)."""

_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
_SMALL_FILES = {".json", ".txt", ".model", ".jinja"}  # what a merged checkpoint carries beside its weights


def free_bytes(directory: Path) -> int:
    """Free bytes for an unprivileged writer on the file system that holds ``directory`` (or its
    nearest existing parent)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check(source: AdapterSource, base: BaseModel, layout: Any, fmt: str, out_type: str, target: Path) -> Optional[int]:
    """Refuse (ExportRefused reason ``disk-space``) when the export cannot fit beside ``target``;
    returns the bytes needed (None where they cannot be estimated)."""
    try:
        need = needed_bytes(source, base, layout, fmt, out_type)
    except Exception as exc:  # noqa: BLE001 - an estimate never stops an export; the write still fails cleanly
        log.warning("export: cannot estimate the disk space %s needs (%s: %s); not checked", fmt,
                    type(exc).__name__, exc)
        return None
    if need is None:
        return None
    free = free_bytes(target.parent)
    if need > free:
        raise errors.ExportRefused(
            f"Cannot export to {fmt} as {out_type}: it needs about {_human(need)} on disk at its peak and "
            f"{target.parent} has {_human(free)} free. Free some space or choose another outputPath.",
            format=fmt, reason="disk-space", needBytes=need, freeBytes=free, path=str(target.parent))
    return need


def needed_bytes(source: AdapterSource, base: BaseModel, layout: Any, fmt: str, out_type: str) -> Optional[int]:
    """The peak bytes of the export (see the module doc); None where they cannot be estimated."""
    if fmt == "gguf-lora":
        return _gguf_lora(source, out_type) + SLACK
    if fmt == "merged":
        return _merged(base, out_type)
    assert base.gguf_path is not None
    adapted = {layout.tensor_name(pair.module) for pair in source.pairs}
    if out_type in quantize.OUT_TYPES:
        from .merge_gguf import INTERMEDIATE

        intermediate = _merged_gguf(base.gguf_path, adapted, INTERMEDIATE, dequantize=True)
        return intermediate + _quantized(base.gguf_path, out_type) + SLACK
    return _merged_gguf(base.gguf_path, adapted, out_type, dequantize=False) + SLACK


def _gguf_lora(source: AdapterSource, out_type: str) -> int:
    from .gguf_layout import choose_qtype, encoded_nbytes

    return sum(encoded_nbytes(m.shape, choose_qtype(m.shape, out_type)) for p in source.pairs for m in (p.a, p.b))


def _merged(base: BaseModel, out_type: str) -> Optional[int]:
    """The base's tensors in ``out_type`` plus its tokenizer and config files; None where the tensors
    cannot be counted without loading them (no safetensors files, no GGUF)."""
    if base.hf_gguf_file and base.gguf_path is not None:
        elements = sum(math.prod(shape) for _, shape, _, _ in _tensors(base.gguf_path))
        return elements * _ELEMENT_BYTES[out_type] + SLACK
    from safetensors import safe_open

    directory = Path(base.hf_path)
    shards = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not shards:
        return None
    elements = 0
    for shard in shards:
        with safe_open(str(shard), framework="numpy") as f:
            elements += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    others = sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.suffix in _SMALL_FILES)
    return elements * _ELEMENT_BYTES[out_type] + others + SLACK


def _tensors(path: Path) -> list[tuple[str, tuple[int, ...], Any, int]]:
    """(name, shape in numpy order, ggml type, stored bytes) of every tensor of a GGUF file, from its
    header (gguf_header: GGUFReader takes seconds on a file with a large vocabulary)."""
    from gguf import GGMLQuantizationType

    from .gguf_header import read_header
    from .gguf_layout import encoded_nbytes

    found = []
    for name, info in read_header(path).tensors.items():
        shape, kind = tuple(reversed(info.shape)), GGMLQuantizationType(info.ggml_type)
        found.append((name, shape, kind, encoded_nbytes(shape, kind)))
    return found


def _merged_gguf(path: Path, adapted: set[Optional[str]], out_type: str, *, dequantize: bool) -> int:
    """The size of ``write_with_deltas(path, …, out_type, dequantize=…)``'s file: every tensor it
    re-encodes at its new size, the others and the metadata as they are."""
    from gguf import GGML_QUANT_SIZES

    from .gguf_layout import choose_qtype, encoded_nbytes

    total = path.stat().st_size
    for name, shape, kind, stored in _tensors(path):
        if name in adapted or (dequantize and GGML_QUANT_SIZES[kind][0] != 1):
            total += encoded_nbytes(shape, choose_qtype(shape, out_type)) - stored
    return total


def _quantized(path: Path, out_type: str) -> int:
    """llama.cpp's output: matrices at the type's nominal bits per weight, vectors as f32, the metadata
    as in the base."""
    total = path.stat().st_size
    for _, shape, _, stored in _tensors(path):
        size = math.prod(shape) * (NOMINAL_BPW[out_type] / 8 if len(shape) > 1 else 4)
        total += math.ceil(size) - stored
    return total


def _human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
