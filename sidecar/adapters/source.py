"""What an adapter directory holds, read without loading any model.

``read_adapter(path)`` gives the PEFT config, the manifest (when the sidecar trained it), the LoRA
pairs with PEFT's own scale for each module, and every other tensor the file carries (full
tensors from ``modules_to_save``, DoRA magnitudes, biases) so that preflight can refuse what a
target format cannot hold. ``resolve_base(...)`` says which base model the adapter belongs to:
a transformers checkpoint, and the GGUF file when the base is one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import errors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST_FILE = "training_manifest.json"
PEFT_PREFIX = "base_model.model."


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


def module_scale(config: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(rank, alpha, scale) that PEFT gives ``module``, with ``rank_pattern``/``alpha_pattern``
    matched by peft's own ``get_pattern_key``, as LoraModel._create_and_replace does."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return int(rank), float(alpha), float(scale)


def read_adapter(path: str | Path) -> AdapterSource:
    """Read ``adapter_config.json``, ``adapter_model.safetensors`` and the manifest (optional).

    Raises AdapterNotFound when the directory or its config/weights are missing.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(path).expanduser().absolute()
    config_file = adapter_dir / ADAPTER_CONFIG
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights.is_file():
        what = ("does not exist" if not adapter_dir.exists()
                else f"has no {ADAPTER_CONFIG}" if not config_file.is_file() else f"has no {ADAPTER_WEIGHTS}")
        raise errors.AdapterNotFound(f"Adapter {adapter_dir} {what}", path=str(adapter_dir))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise errors.AdapterNotFound(f"Adapter {adapter_dir}: {ADAPTER_CONFIG} is not valid JSON: {exc}",
                                     path=str(adapter_dir)) from None
    manifest = None
    if (adapter_dir / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((adapter_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        except ValueError:
            manifest = None  # not ours, or damaged: export without recording

    tensors = load_file(str(weights), device="cpu")
    halves: dict[str, dict[str, Any]] = {}
    other: dict[str, tuple[int, ...]] = {}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if match:
            halves.setdefault(match.group(1), {})[match.group(2)] = tensor
        else:
            other[name] = tuple(tensor.shape)
    pairs = []
    for module in sorted(halves, key=_natural_key):
        half = halves[module]
        if set(half) != {"A", "B"}:
            raise errors.AdapterNotFound(f"Adapter {adapter_dir} is damaged: {module} has lora_{''.join(half)} "
                                         "but not its partner", path=str(adapter_dir), module=module)
        a, b = half["A"].float().numpy(), half["B"].float().numpy()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            other[f"{module}.lora_A.weight"] = tuple(a.shape)  # conv LoRA etc.: preflight refuses it
            other[f"{module}.lora_B.weight"] = tuple(b.shape)
            continue
        rank, alpha, scale = module_scale(config, module)
        if rank != a.shape[0]:
            raise errors.AdapterNotFound(
                f"Adapter {adapter_dir}: {module} has rank {a.shape[0]} in its weights but {rank} in "
                f"{ADAPTER_CONFIG}", path=str(adapter_dir), module=module)
        pairs.append(LoraPair(module=module, a=a, b=b, rank=rank, alpha=alpha, scale=scale))
    return AdapterSource(path=adapter_dir, config=config, manifest=manifest, pairs=pairs, other_tensors=other)


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
