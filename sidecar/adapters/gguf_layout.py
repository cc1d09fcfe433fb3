"""Where a transformers weight lives in a GGUF model, and in which row and column order.

llama.cpp's converter (convert_hf_to_gguf.py) renames every tensor with gguf's own tables
(``gguf.get_tensor_name_map``) and, for some architectures, reorders a weight's rows or columns
(``gguf_arch`` holds the rules per architecture: the Llama q/k row permutation, Qwen3.5's value-head
reordering). Anything added to those weights — a LoRA's ``B`` (its rows are output rows), its ``A``
(its columns are input columns), or a merged delta — is reordered the same way.

``check_against_base`` verifies the layout on the real base file: every tensor exists with the
expected shape, and for each reordered kind of tensor a dequantized one from the GGUF matches the
checkpoint's weight in the order this module assumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import errors
from .gguf_arch import (EXPORTABLE, LANGUAGE_MODEL_PREFIXES, RULES, ArchRule, Order, permute_index, tensor_kind,
                        text_module)

SUPPORTED = ", ".join(EXPORTABLE)


@dataclass(frozen=True)
class GgufLayout:
    arch: str
    """GGUF ``general.architecture`` (must equal the base file's for llama.cpp to load an adapter)."""
    n_blocks: int
    n_head: int
    n_head_kv: int
    rule: ArchRule
    name_map: Any
    orders: dict[str, Order] = field(default_factory=dict)
    """Tensor kind → (row index, column index) into the transformers weight; see ``gguf_arch``."""

    def tensor_name(self, module: str) -> Optional[str]:
        """``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q.weight``; None when unmapped. The
        text model of an image-text checkpoint (``model.language_model.…``) maps like a text model."""
        return self.name_map.get_name(text_module(module) + ".weight", try_suffixes=(".weight",))

    def holds_lora(self, gguf_name: str) -> bool:
        """Whether llama.cpp adds a LoRA to this tensor (multiplies it through ``build_lora_mm``)."""
        return tensor_kind(gguf_name) in self.rule.lora_kinds

    def order(self, gguf_name: str) -> Order:
        return self.orders.get(tensor_kind(gguf_name), (None, None))

    def reorders(self, gguf_name: str) -> bool:
        return any(index is not None for index in self.order(gguf_name))

    def factors_to_gguf(self, gguf_name: str, a: Any, b: Any) -> tuple[Any, Any]:
        """A LoRA's (A, B) for the GGUF tensor: B's rows and A's columns in the file's order."""
        rows, cols = self.order(gguf_name)
        return (a if cols is None else a[:, cols]), (b if rows is None else b[rows])

    def delta_to_gguf(self, gguf_name: str, delta: Any) -> Any:
        """A full (out, in) weight or delta in the GGUF file's row and column order."""
        rows, cols = self.order(gguf_name)
        delta = delta if rows is None else delta[rows]
        return delta if cols is None else delta[:, cols]

    def rows_to_gguf(self, gguf_name: str, rows: Any) -> Any:
        """Reorder the output rows of a (out, …) array into the GGUF file's order (no column order)."""
        index = self.order(gguf_name)[0]
        return rows if index is None else rows[index]


def permute_rows(w: Any, n_head: int) -> Any:
    """llama.cpp's Llama q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w[permute_index(w.shape[0], n_head)]


def read_config(base: Any) -> dict[str, Any]:
    """The base's config as a plain dict, with transformers' defaults filled in (``config.json``
    leaves out values equal to the class defaults, e.g. Llama's ``tie_word_embeddings=False``). A
    config transformers cannot read (an unknown ``model_type``) is read as plain JSON, so that the
    architecture is reported as such rather than as a load failure."""
    from .source import base_config

    try:
        config = base_config(base).to_dict()
    except errors.ModelLoadFailed:
        config_file = Path(base.hf_path) / "config.json"
        if base.hf_gguf_file is not None or not config_file.is_file():
            raise
        config = json.loads(config_file.read_text(encoding="utf-8"))
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        return {"tie_word_embeddings": config.get("tie_word_embeddings"), **config["text_config"]}
    return config


def layout_for(config: dict[str, Any], base_gguf: Optional[Path], fmt: str) -> GgufLayout:
    """The GGUF layout for a base with this config (and this base file, when it is one).

    Raises ExportRefused for an architecture gguf has no tensor map for, or that this exporter
    does not write.
    """
    import gguf

    model_type = str(config.get("model_type") or "unknown")
    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if model_type not in RULES:
        # transformers and gguf spell some names differently (gpt_neox / gptneox)
        known = any(n in by_name for n in (model_type, model_type.replace("_", "-"), model_type.replace("_", "")))
        why = ("gguf has a tensor map for it, but its GGUF layout (row order, fused tensors) is not one this "
               "exporter writes" if known else "gguf has no tensor map for this architecture")
        raise errors.ExportRefused(
            f"Cannot export to {fmt}: the base model's architecture is {model_type!r}; {why} (supported: "
            f"{SUPPORTED}). Export format 'merged' instead (a transformers checkpoint works for any "
            "architecture) and convert it with llama.cpp's convert_hf_to_gguf.py if you need GGUF.",
            format=fmt, reason="architecture", modelType=model_type)
    rule = RULES[model_type]
    arch = rule.gguf_arch if base_gguf is None else gguf_architecture(base_gguf)
    if arch not in by_name:
        raise errors.ExportRefused(f"Cannot export to {fmt}: gguf has no tensor map for architecture {arch!r}",
                                   format=fmt, reason="architecture", modelType=model_type)
    n_blocks = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    return GgufLayout(arch=arch, n_blocks=n_blocks, n_head=n_head, n_head_kv=n_head_kv, rule=rule,
                      orders=rule.orders(config),
                      name_map=gguf.get_tensor_name_map(by_name[arch], n_blocks))


def gguf_architecture(path: Path) -> str:
    from .gguf_header import read_header

    try:
        arch = read_header(path).architecture
    except (OSError, ValueError) as exc:
        raise errors.ModelLoadFailed(f"Cannot read the base model file {path}: {exc}", path=str(path)) from None
    if not arch:
        raise errors.ModelLoadFailed(f"{path} has no general.architecture; is it a GGUF model?", path=str(path))
    return arch


def check_against_base(layout: GgufLayout, targets: dict[str, tuple[str, int, int]], base_gguf: Path,
                       hf_dir: Optional[str], fmt: str) -> None:
    """Check the mapped tensors against the base file: each exists with shape (out, in), and the
    row/column order assumed here (one tensor of each reordered kind, and q/k always) reproduces the
    file's tensors from the checkpoint's weights.

    ``targets``: GGUF tensor name → (module, out_features, in_features) of the module adapted there.
    """
    from .gguf_header import read_header

    header = read_header(base_gguf)
    tensors = header.tensors
    for name, (module, out_f, in_f) in targets.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise errors.ExportRefused(
                f"Cannot export to {fmt}: the base file {base_gguf.name} has no tensor {name} (the adapter "
                f"adapts {module} there); is this the adapter's base model?", format=fmt,
                reason="base-mismatch", tensor=name)
        if [int(x) for x in tensor.shape] != [in_f, out_f]:
            raise errors.ExportRefused(
                f"Cannot export to {fmt}: {name} is {[int(x) for x in tensor.shape]} (ne) in {base_gguf.name} but "
                f"the adapter's {module} needs [{in_f}, {out_f}]; is this the adapter's base model?", format=fmt,
                reason="base-mismatch", tensor=name)
    if hf_dir is None:
        return
    checked: set[str] = set()
    for name, (module, _, _) in targets.items():
        kind = tensor_kind(name)
        if kind in checked or (not layout.reorders(name) and kind not in ("attn_q", "attn_k")):
            continue
        checked.add(kind)
        reference = _read_checkpoint_tensor(Path(hf_dir), module)
        if reference is not None:  # without a safetensors checkpoint the table's rule stands
            _check_order(layout, name, header.tensor_data(name), reference, fmt)


def _check_order(layout: GgufLayout, gguf_name: str, stored: Any, reference: Any, fmt: str) -> None:
    """The file's tensor is the checkpoint's weight in the order assumed here, not in the other one:
    as it is for a reordered tensor, or llama's q/k permutation for a tensor kept as it is."""
    import numpy as np

    assumed = layout.delta_to_gguf(gguf_name, reference)
    rows, cols = layout.order(gguf_name)
    if layout.reorders(gguf_name):
        other = reference
        # compare where the order moves something (a quantized file's rounding stays small there)
        moved_rows = slice(None) if rows is None else rows != np.arange(len(rows))
        moved_cols = slice(None) if cols is None else cols != np.arange(len(cols))
        stored, assumed, other = (x[moved_rows][:, moved_cols] for x in (stored, assumed, other))
    else:
        other = permute_rows(reference, layout.n_head if tensor_kind(gguf_name) == "attn_q" else layout.n_head_kv)
    err_assumed = float(np.abs(stored - assumed).mean())
    err_other = float(np.abs(stored - other).mean())
    # The file holds a quantization of the same weights: in the right order they differ by
    # rounding only, in the wrong one by about the weights' own size.
    if err_assumed > 0.25 * err_other:
        raise errors.ExportRefused(
            f"Cannot export to {fmt}: the rows or columns of {gguf_name} in the base file are not in the order this "
            f"exporter assumes for architecture {layout.arch!r} (mean error {err_assumed:.3g}, against "
            f"{err_other:.3g} in the other order): the GGUF file and the checkpoint disagree. Export 'merged' "
            "instead.", format=fmt, reason="layout", tensor=gguf_name)


def _read_checkpoint_tensor(hf_dir: Path, module: str) -> Any:
    """The checkpoint's weight of ``module`` (as named in the adapter, or under the text model of an
    image-text checkpoint); None when no safetensors file holds it."""
    from safetensors import safe_open

    plain = text_module(module)
    keys = [module + ".weight"] + [p + plain.removeprefix("model.") + ".weight" for p in LANGUAGE_MODEL_PREFIXES]
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = set(handle.keys())
            for key in keys:
                if key in names:
                    return handle.get_tensor(key).float().numpy()
    return None


# ---------------------------------------------------------------------------------------------
# Tensor encodings (gguf's own quantizers)
# ---------------------------------------------------------------------------------------------

def qtype(out_type: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]


def file_type(out_type: str) -> Any:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[out_type]


def choose_qtype(shape: tuple[int, ...], out_type: str) -> Any:
    """The ggml type a tensor of ``shape`` (numpy order, rows last) gets for ``out_type``: rows that
    Q8_0's 32-wide blocks do not divide (a LoRA B of rank 8 or 16) become F16, as in llama.cpp's
    own converter."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    kind = qtype(out_type)
    if kind == Q.Q8_0 and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16
    return kind


def encode(array: Any, out_type: str) -> tuple[Any, Any]:
    """(data, ggml type) of ``array`` encoded for ``out_type`` with gguf's quantizers."""
    import numpy as np
    from gguf import quants

    array = np.ascontiguousarray(array, dtype=np.float32)
    kind = choose_qtype(array.shape, out_type)
    return quants.quantize(array, kind), kind


def encoded_nbytes(shape: tuple[int, ...], kind: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows * shape[-1] // block * size
