"""What an adapter directory holds, read without loading any model.

``read_adapter(path)`` gives the PEFT config, the manifest (when the sidecar trained it), the LoRA
pairs with PEFT's own scale for each module, and every other tensor the file carries (full
tensors from ``modules_to_save``, DoRA magnitudes, biases) so that preflight can refuse what a
target format cannot hold. ``resolve_base(...)`` says which base model the adapter belongs to:
a transformers checkpoint, and the GGUF file when the base is one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import errors
from . import fit
from .fit import PEFT_PREFIX, module_scale


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: ``W' = W + scale · B @ A`` (PEFT's forward, dropout aside)."""

    module: str
    """Module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``."""
    a: Any
    """lora_A weight, numpy float32 (rank, in_features)."""
    b: Any
    """lora_B weight, numpy float32 (out_features, rank)."""
    rank: int
    alpha: float
    scale: float
    """What PEFT multiplies B @ A by: alpha/rank, or alpha/sqrt(rank) with rsLoRA."""


@dataclass
class AdapterSource:
    path: Path
    config: dict[str, Any]
    manifest: Optional[dict[str, Any]]
    pairs: list[LoraPair]
    other_tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Every tensor that is not part of a lora_A/lora_B pair: name (PEFT prefix removed) → shape."""

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def name(self) -> str:
        return self.path.name


def read_adapter(path: str | Path) -> AdapterSource:
    """Read ``adapter_config.json``, ``adapter_model.safetensors`` and the manifest (optional), through
    fit.py (its errors: AdapterNotFound, AdapterInvalid, AdapterBaseMismatch for a rank that is not the
    config's)."""
    files = fit.read(path)
    halves, rest = fit.split_lora(fit.tensors(files))
    fit.check_pairs(files, halves)
    other = {key.removeprefix(PEFT_PREFIX): tuple(tensor.shape) for key, tensor in rest.items()}
    pairs = []
    for module in sorted(halves, key=_natural_key):
        a, b = halves[module]["A"].float().numpy(), halves[module]["B"].float().numpy()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            other[f"{module}.lora_A.weight"] = tuple(a.shape)  # conv LoRA etc.: preflight refuses it
            other[f"{module}.lora_B.weight"] = tuple(b.shape)
            continue
        rank, alpha, scale = module_scale(files.config, module)
        if rank != a.shape[0]:
            raise fit.rank_mismatch(files, module, a.shape[0])
        pairs.append(LoraPair(module=module, a=a, b=b, rank=rank, alpha=alpha, scale=scale))
    return AdapterSource(path=files.dir, config=files.config, manifest=files.manifest, pairs=pairs,
                         other_tensors=other)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------
# The base model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseModel:
    name: str
    """As recorded (manifest ``baseModel.name``) or given (``baseModel`` param)."""
    kind: str
    """``embedded`` | ``directory`` | ``gguf`` | ``hub-cache`` | ``hub``."""
    hf_path: str
    """What ``from_pretrained`` opens (with ``gguf_file`` for kind ``gguf``)."""
    hf_gguf_file: Optional[str]
    gguf_path: Optional[Path]
    """The base as a GGUF file (embedded, or a .gguf base); None for transformers checkpoints."""


def resolve_base(source: AdapterSource, override: Optional[str] = None) -> BaseModel:
    """Find the adapter's base: ``override``, else the manifest's base model, else the adapter
    config's ``base_model_name_or_path``. Raises ModelNotFound saying what was tried."""
    from .. import models

    candidates: list[str] = []
    if override:
        candidates.append(override)
    else:
        recorded = (source.manifest or {}).get("baseModel") or {}
        if recorded.get("name"):
            candidates.append(recorded["name"])
        if recorded.get("path"):
            where = Path(recorded["path"])
            candidates.append(str(where / recorded["ggufFile"]) if recorded.get("ggufFile") else str(where))
        if source.config.get("base_model_name_or_path"):
            candidates.append(source.config["base_model_name_or_path"])
    if not candidates:
        raise errors.ModelNotFound(
            f"Adapter {source.path} names no base model (no manifest, no base_model_name_or_path); pass baseModel",
            path=str(source.path))
    failures = []
    for name in dict.fromkeys(candidates):
        try:
            resolved = models.resolve_model(name)
        except errors.ModelNotFound as exc:
            failures.append(exc.message)
            continue
        embedded_dir = models.embedded_checkpoint_dir().absolute()
        if resolved.kind == "embedded" or Path(resolved.path).absolute() == embedded_dir:
            return BaseModel(name=name, kind="embedded", hf_path=str(resolved.path), hf_gguf_file=None,
                             gguf_path=models.embedded_gguf_path())
        gguf_path = Path(resolved.path) / resolved.gguf_file if resolved.gguf_file else None
        return BaseModel(name=name, kind=resolved.kind, hf_path=resolved.path, hf_gguf_file=resolved.gguf_file,
                         gguf_path=gguf_path)
    raise errors.ModelNotFound(
        f"The base model of adapter {source.path} cannot be found (tried {', '.join(map(repr, candidates))}); "
        "pass baseModel", path=str(source.path), tried=failures)


def base_config(base: BaseModel) -> Any:
    """The base's transformers config (no weights are read)."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": base.hf_gguf_file} if base.hf_gguf_file else {}
    try:
        return AutoConfig.from_pretrained(base.hf_path, **kwargs)
    except Exception as exc:
        raise errors.ModelLoadFailed(f"Cannot read the config of base model {base.name!r} ({base.hf_path}): "
                                     f"{type(exc).__name__}: {exc}", name=base.name) from exc
