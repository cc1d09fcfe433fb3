"""Before anything is written: can the target runtime take this adapter? Refuse clearly if not.

Each refusal is an ``ExportRefused`` whose message says what is in the adapter, why the format
cannot hold it, and what to do instead; ``data.reason`` names the case for programs.
"""

from __future__ import annotations

from typing import Any, Optional

from .. import errors
from . import quantize
from .source import AdapterSource, BaseModel

FORMATS = ("gguf-lora", "merged", "merged-gguf")
OUT_TYPES = {
    "gguf-lora": ("f32", "f16", "bf16", "q8_0"),
    "merged": ("f32", "f16", "bf16"),
    "merged-gguf": ("f32", "f16", "bf16", "q8_0") + quantize.OUT_TYPES,  # the last ones by llama.cpp
}
GGUF_FORMATS = ("gguf-lora", "merged-gguf")
# PEFT initialisations that rewrite the base weights: the adapter only holds with that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda")


def _refuse(fmt: str, reason: str, text: str, **data: Any) -> errors.ExportRefused:
    return errors.ExportRefused(f"Cannot export to {fmt}: {text}", format=fmt, reason=reason, **data)


def check(source: AdapterSource, base: BaseModel, config: dict[str, Any], fmt: str, out_type: str) -> None:
    """Raise ExportRefused for anything ``fmt`` cannot represent; return when the export can go ahead."""
    if out_type not in OUT_TYPES[fmt]:
        raise errors.InvalidParams(f"outType {out_type!r} is not available for format {fmt!r} "
                                   f"(use {', '.join(OUT_TYPES[fmt])})", field="$.outType")
    if out_type in quantize.OUT_TYPES:
        why = quantize.missing()
        if why is not None:
            raise quantize.refusal(fmt, out_type, why)
    peft_type = str(source.config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _refuse(fmt, "peft-type", f"the adapter is a {peft_type} adapter; only LoRA adapters are exported.")
    init = str(source.config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise _refuse(fmt, "init", f"the adapter was initialised with {init!r}, which rewrites the base weights; "
                      "it only computes what it was trained to on that rewritten base. Convert it to a plain LoRA "
                      "first (peft: save_pretrained(..., path_initial_model_for_weight_conversion=...)).")
    if source.config.get("layer_replication"):
        raise _refuse(fmt, "layer-replication", "the adapter uses layer_replication (a different layer stack "
                      "than the base); no runtime file format here holds that.")
    if not source.pairs:
        raise _refuse(fmt, "empty", "the adapter has no LoRA weight pairs (lora_A/lora_B).")
    _check_tied_head(source, config, fmt)
    if fmt in GGUF_FORMATS:
        _check_gguf(source, base, fmt)


def _check_tied_head(source: AdapterSource, config: dict[str, Any], fmt: str) -> None:
    tied = bool(config.get("tie_word_embeddings", True))
    head = [p.module for p in source.pairs if p.module.rsplit(".", 1)[-1] == "lm_head"]
    if head and tied:
        raise _refuse(fmt, "tied-lm-head", "the adapter targets the LM head (lm_head), but the base model ties it "
                      "to the token embeddings (tie_word_embeddings): folding or attaching it would change the "
                      "embeddings as well. Train the adapter without lm_head in targetModules.", modules=head)


def _check_gguf(source: AdapterSource, base: BaseModel, fmt: str) -> None:
    if fmt == "merged-gguf" and base.gguf_path is None:
        raise _refuse(fmt, "base-not-gguf", f"the base model {base.name!r} is a transformers checkpoint, not a "
                      ".gguf file, so there is no GGUF base to merge into. Pass the .gguf converted from that "
                      "checkpoint (the model llama.cpp serves) as baseModel. Export 'merged' and convert it with "
                      "llama.cpp's convert_hf_to_gguf.py, or export 'gguf-lora', otherwise.")
    if source.use_dora and fmt == "gguf-lora":
        raise _refuse(fmt, "dora", "the adapter uses DoRA (a learned magnitude per output column), which a LoRA "
                      "file cannot represent: llama.cpp only adds scale·B·A. Export 'merged' (or 'merged-gguf' "
                      "for a GGUF base) instead: the DoRA update is folded into the weights there.")
    full = sorted(k for k in source.other_tensors if "lora_magnitude_vector" not in k)  # DoRA: checked above
    saved = source.config.get("modules_to_save") or []
    if saved or any("embed" in k or "lm_head" in k or "modules_to_save" in k for k in full):
        raise _refuse(fmt, "modules-to-save", "the adapter carries full trained tensors (modules_to_save: "
                      f"{', '.join(saved) or '—'}; tensors: {', '.join(full[:6]) or '—'}), typically an embedding "
                      "or LM head resized for new tokens. A GGUF LoRA file only holds low-rank pairs. Export "
                      "'merged' instead (a transformers checkpoint with those tensors in place).",
                      tensors=full[:20])
    if source.config.get("trainable_token_indices"):
        raise _refuse(fmt, "trainable-tokens", "the adapter trains individual token embeddings "
                      "(trainable_token_indices), which a GGUF LoRA file cannot hold. Export 'merged' instead.")
    embedding = [k for k in full if "lora_embedding" in k]
    if embedding:
        raise _refuse(fmt, "embedding-lora", "the adapter puts LoRA on the token embedding; this exporter writes "
                      "LoRA for linear layers only. Export 'merged' instead.", tensors=embedding[:20])
    not_linear = sorted({k.split(".lora_")[0] for k in full if ".lora_A." in k or ".lora_B." in k})
    if not_linear:  # conv LoRA (e.g. Qwen3.5's depthwise conv1d): llama.cpp adds LoRA to matrix products only
        raise _refuse(fmt, "not-lora-capable", f"the adapter puts LoRA on {', '.join(not_linear[:8])}, which are not "
                      "linear layers (a convolution); a GGUF LoRA file holds LoRA for matrix products only. Retrain "
                      "without those modules in targetModules, or export 'merged' instead.", modules=not_linear[:20])
    if full or str(source.config.get("bias", "none")) != "none" or source.config.get("lora_bias"):
        raise _refuse(fmt, "bias", "the adapter trains bias terms or other full tensors "
                      f"({', '.join(full[:6]) or 'bias=' + str(source.config.get('bias'))}), which this GGUF "
                      "export does not carry. Export 'merged' instead.", tensors=full[:20])
    if source.config.get("fan_in_fan_out"):
        raise _refuse(fmt, "fan-in-fan-out", "the adapter was made for Conv1D (fan_in_fan_out) layers, an "
                      "architecture this exporter does not write to GGUF. Export 'merged' instead.")
    if source.config.get("alora_invocation_tokens") or source.config.get("target_parameters"):
        raise _refuse(fmt, "variant", "the adapter is an activated LoRA or targets raw parameters; this exporter "
                      "writes plain LoRA only. Export 'merged' instead.")


def check_modules(source: AdapterSource, layout: Any, fmt: str) -> dict[str, tuple[str, int, int]]:
    """Every adapted module's GGUF tensor: name → (module, out_features, in_features). Refuses,
    naming all of them, modules gguf's table has no tensor for and modules whose tensor llama.cpp
    cannot add a LoRA to (it is not multiplied through ``build_lora_mm``: a convolution, a norm)."""
    targets: dict[str, tuple[str, int, int]] = {}
    unmapped, unheld = [], []
    for pair in source.pairs:
        name = layout.tensor_name(pair.module)
        if name is None:
            unmapped.append(pair.module)
        elif not layout.holds_lora(name):
            unheld.append(f"{pair.module} ({name})")
        else:
            targets[name] = (pair.module, int(pair.b.shape[0]), int(pair.a.shape[1]))
    if unmapped:
        raise _refuse(fmt, "unmapped", f"gguf's {layout.arch} tensor map has no name for the adapted module(s) "
                      f"{', '.join(unmapped[:8])}{' …' if len(unmapped) > 8 else ''}. Retrain without them in "
                      "targetModules, or export 'merged' instead.", module=unmapped[0], modules=unmapped[:20])
    if unheld:
        raise _refuse(fmt, "not-lora-capable", f"llama.cpp's {layout.arch} graph does not apply a LoRA to the tensor "
                      f"of {', '.join(unheld[:8])}{' …' if len(unheld) > 8 else ''} (it is not a plain matrix "
                      "product there). Retrain without those modules in targetModules, or export 'merged' instead.",
                      modules=unheld[:20])
    return targets


def default_out_type(fmt: str, base_dtype: Optional[str]) -> str:
    """``f16`` for GGUF formats; for ``merged`` the base checkpoint's own dtype (fp32 stays fp32)."""
    if fmt != "merged":
        return "f16"
    return {"float16": "f16", "bfloat16": "bf16"}.get(str(base_dtype or "float32"), "f32")
