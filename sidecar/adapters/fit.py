"""Reading an adapter directory — the one reader — and checking an adapter against a base model.

An adapter directory is what PEFT writes: ``adapter_config.json`` + ``adapter_model.safetensors``,
and ``training_manifest.json`` when the sidecar trained it. Everything that reads one (resident
adapters, exports, ``initFrom``, ``generate``'s ``adapterPath``) reads it here, so a fault is the
same error wherever it is found:

- no directory, no config, no weights file: AdapterNotFound (-32018);
- a config or weights file that cannot be read or parsed, a lora_A without its lora_B (or the
  reverse): AdapterInvalid (-32025);
- a rank in the weights other than the config's: AdapterBaseMismatch (-32021, ``rankMismatches``),
  as the resident load documents it;
- not LoRA, or a LoRA kind that is not a plain W + s·B·A on linear layers: AdapterUnsupported (-32024).

No torch at import: tensors are loaded (``tensors``) only by the callers that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

from .. import errors
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, MANIFEST_FILE

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
PICKLE_FILE = "adapter_model.bin"
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AdapterFiles:
    """The files of an adapter directory, read once (the hashes are of exactly the bytes read)."""

    dir: Path
    config: dict[str, Any]
    config_bytes: bytes
    weights: bytes
    manifest: Optional[dict[str, Any]] = None
    """``training_manifest.json`` when present and a JSON object (not ours, or damaged: None)."""
    manifest_bytes: Optional[bytes] = None

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    @functools.cached_property
    def config_sha256(self) -> str:
        return hashlib.sha256(self.config_bytes).hexdigest()

    @property
    def manifest_sha256(self) -> Optional[str]:
        return hashlib.sha256(self.manifest_bytes).hexdigest() if self.manifest is not None else None

    @property
    def base_name(self) -> Optional[str]:
        """The config's ``base_model_name_or_path``, when it names one."""
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name.strip() else None


def locate(path: str | Path, *, field: Optional[str] = None, what: str = "Adapter",
           pickle_ok: bool = False) -> Path:
    """The adapter directory at ``path`` (absolute); AdapterNotFound when it is not one.
    ``pickle_ok``: an ``adapter_model.bin`` counts as the weights file (stock PEFT reads it)."""
    adapter_dir = Path(path).expanduser().absolute()
    data = {"path": str(path), **({"field": field} if field else {})}
    if not adapter_dir.is_dir():
        why = "is not a directory" if adapter_dir.exists() else "does not exist"
        raise errors.AdapterNotFound(f"{what} {path} {why}", **data)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise errors.AdapterNotFound(f"{what} {path} has no {ADAPTER_CONFIG}", **data)
    pickled = (adapter_dir / PICKLE_FILE).is_file()
    if not (adapter_dir / ADAPTER_FILE).is_file() and not (pickle_ok and pickled):
        other = " (only adapter_model.bin, a pickle: re-save it with safetensors)" if pickled else ""
        raise errors.AdapterNotFound(f"{what} {path} has no {ADAPTER_FILE}{other}", **data)
    return adapter_dir


def read_config(path: str | Path, *, field: Optional[str] = None, what: str = "Adapter") -> tuple[Path, dict]:
    """(directory, config) of the adapter at ``path``: its weights file must exist but is not read."""
    adapter_dir = locate(path, field=field, what=what)
    return adapter_dir, _config(adapter_dir, path, what)[0]


def read(path: str | Path, *, field: Optional[str] = None, what: str = "Adapter") -> AdapterFiles:
    """Read the adapter directory at ``path``: config, weights (as bytes) and manifest."""
    adapter_dir = locate(path, field=field, what=what)
    config, config_bytes = _config(adapter_dir, path, what)
    try:
        weights = (adapter_dir / ADAPTER_FILE).read_bytes()
    except OSError as exc:
        raise errors.AdapterInvalid(f"{what} {path} cannot be read: {exc}", path=str(path)) from None
    manifest, manifest_bytes = None, None
    try:
        manifest_bytes = (adapter_dir / MANIFEST_FILE).read_bytes()
        manifest = json.loads(manifest_bytes)
    except (OSError, ValueError):
        pass
    if not isinstance(manifest, dict):
        manifest, manifest_bytes = None, None
    return AdapterFiles(adapter_dir, config, config_bytes, weights, manifest, manifest_bytes)


def _config(adapter_dir: Path, path: str | Path, what: str) -> tuple[dict[str, Any], bytes]:
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        text = config_path.read_bytes()
        config = json.loads(text)
    except (OSError, ValueError) as exc:
        raise errors.AdapterInvalid(f"{what} {path} cannot be read: {exc}", path=str(path)) from None
    if not isinstance(config, dict):
        raise errors.AdapterInvalid(f"{config_path} is not a JSON object", path=str(path))
    return config, text


def tensors(files: AdapterFiles) -> dict[str, "torch.Tensor"]:
    """Every tensor of the weights file by its key (on the CPU)."""
    from safetensors.torch import load

    try:
        return load(files.weights)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise errors.AdapterInvalid(f"{files.dir / ADAPTER_FILE} cannot be read as safetensors: {exc}",
                                    path=str(files.dir)) from None


def split_lora(flat: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({module: {"A": lora_A, "B": lora_B}}, {key: tensor})``: the LoRA halves by module path of
    the base (PEFT's prefix removed) and every other tensor by its key."""
    halves: dict[str, dict[str, Any]] = {}
    other: dict[str, Any] = {}
    for key, tensor in flat.items():
        match = _LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if match:
            halves.setdefault(match.group(1), {})[match.group(2)] = tensor
        else:
            other[key] = tensor
    return halves, other


def check_pairs(files: AdapterFiles, halves: Mapping[str, Mapping[str, Any]]) -> None:
    """AdapterInvalid for a module with only one of lora_A / lora_B."""
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            has, lacks = ("A", "B") if "A" in pair else ("B", "A")
            raise errors.AdapterInvalid(f"Adapter {files.dir}: {module} has lora_{has} but not lora_{lacks}",
                                        path=str(files.dir), module=module)


def module_scale(config: Mapping[str, Any], module: str) -> tuple[int, float, float]:
    """(rank, alpha, scale) that PEFT gives ``module``, with ``rank_pattern``/``alpha_pattern``
    matched by peft's own ``get_pattern_key``, as LoraModel._create_and_replace does."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return int(rank), float(alpha), float(scale)


def rank_mismatch(files: AdapterFiles, module: str, rank: int) -> errors.AdapterBaseMismatch:
    """The error for a module whose weights have another rank than the config gives it."""
    expected = module_scale(files.config, module)[0]
    return errors.AdapterBaseMismatch(
        f"Adapter {files.dir}: {module} has rank {rank} in its weights but {expected} in {ADAPTER_CONFIG}",
        path=str(files.dir), module=module, rankMismatches=[f"{module}: rank {rank} in the weights, "
                                                            f"{expected} in the config"])


# ---------------------------------------------------------------------------------------------
# What can be resident: plain LoRA on linear layers
# ---------------------------------------------------------------------------------------------

def lora_config(files: AdapterFiles) -> Any:
    """The adapter's LoraConfig; AdapterUnsupported for kinds that are not plain LoRA on Linear layers."""
    from peft import PeftConfig

    path = str(files.dir)
    peft_type = str(files.config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise errors.AdapterUnsupported(f"Adapter {path} is a {peft_type or 'non-PEFT'} adapter; only LoRA "
                                        "adapters can be resident", path=path, peftType=peft_type or None)
    try:
        config = PeftConfig.from_peft_type(**files.config)
    except Exception as exc:  # noqa: BLE001 - peft validates its config in __post_init__
        raise errors.AdapterInvalid(f"{files.dir / ADAPTER_CONFIG} is not a valid LoRA config: {exc}",
                                    path=path) from None
    unsupported = []
    if config.use_dora:
        unsupported.append("DoRA (use_dora: its magnitude vector rescales W + B·A, so it is not an additive "
                           "update that stacks, and PEFT's mixed batches refuse it)")
    if config.lora_bias:
        unsupported.append("lora_bias")
    if config.modules_to_save:
        unsupported.append(f"modules_to_save {sorted(config.modules_to_save)} (fully trained copies of layers)")
    if getattr(config, "target_parameters", None):
        unsupported.append("target_parameters")
    if getattr(config, "trainable_token_indices", None):
        unsupported.append("trainable_token_indices")
    variants = [f.name for f in dataclasses.fields(config)
                if f.metadata.get("is_lora_variant") and f.name != "use_dora" and getattr(config, f.name)]
    unsupported += [f"the LoRA variant {name}" for name in variants]
    if unsupported:
        raise errors.AdapterUnsupported(
            f"Adapter {path} uses {', '.join(unsupported)}; resident and stacked adapters must be plain LoRA on "
            "linear layers. generate with adapterPath still applies it (one call, read from disk).",
            path=path, unsupported=unsupported)
    return config


def plain_lora(files: AdapterFiles) -> dict[str, dict[str, "torch.Tensor"]]:
    """``{module path: {"A": tensor, "B": tensor}}`` (on the CPU): every tensor a 2-D LoRA half."""
    path = str(files.dir)
    flat = tensors(files)
    modules, rest = split_lora(flat)
    other = [k for k in flat if k in rest or not k.startswith(PEFT_PREFIX)]
    if other:
        kinds = sorted({k.rsplit(".", 2)[-2] if k.count(".") >= 2 else k for k in other})
        raise errors.AdapterUnsupported(
            f"Adapter {path} holds {len(other)} tensors that are not LoRA A/B weights of linear layers "
            f"(e.g. {other[0]}; kinds: {', '.join(kinds[:5])})", path=path, keys=other[:10])
    if not modules:
        raise errors.AdapterInvalid(f"{files.dir / ADAPTER_FILE} holds no LoRA weights", path=path)
    check_pairs(files, modules)
    for module, pair in modules.items():
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise errors.AdapterInvalid(f"Adapter {path}: {module} has lora_A {tuple(a.shape)} and lora_B "
                                        f"{tuple(b.shape)}, which do not chain", path=path, module=module)
    return modules


# ---------------------------------------------------------------------------------------------
# Against a base model
# ---------------------------------------------------------------------------------------------

_DIFFERENCES = (
    ("target modules absent from the base", "absentModules"),
    ("adapted modules that are not Linear layers in the base", "notLinear"),
    ("shape mismatches", "shapeMismatches"),
    ("modules the config targets in this base but the adapter has no weights for", "uncoveredModules"),
    ("rank mismatches between weights and config", "rankMismatches"),
)


def base_differences(config: Any, modules: dict[str, dict[str, Any]], model: Any) -> tuple[list[str], dict]:
    """What differs between an adapter (its LoraConfig and ``plain_lora`` modules) and a base model;
    empty when the adapter fits.

    Checked: every adapted module exists in the base and is a Linear layer of the adapter's shape;
    every module the config targets in this base has weights (else PEFT would leave it at its
    initialisation: a sign of a different architecture, e.g. more layers); the ranks in the file match
    the config's (r, rank_pattern)."""
    import torch.nn as nn
    from peft.tuners.tuners_utils import check_target_module_exists

    found: dict[str, list[str]] = {key: [] for _, key in _DIFFERENCES}
    settings = vars(config)
    for module, pair in sorted(modules.items()):
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            found["absentModules"].append(module)
            continue
        if not isinstance(layer, nn.Linear):
            found["notLinear"].append(f"{module} ({type(layer).__name__})")
            continue
        r, in_features = pair["A"].shape
        out_features = pair["B"].shape[0]
        if (in_features, out_features) != (layer.in_features, layer.out_features):
            found["shapeMismatches"].append(f"{module}: adapter {in_features}→{out_features}, base "
                                            f"{layer.in_features}→{layer.out_features}")
        expected = module_scale(settings, module)[0]
        if r != expected:
            found["rankMismatches"].append(f"{module}: rank {r} in the weights, {expected} in the config")
    if config.target_modules != "all-linear":
        for name, layer in model.named_modules():
            if name and name not in modules and isinstance(layer, nn.Linear) \
                    and check_target_module_exists(config, name) is True:
                found["uncoveredModules"].append(name)
    problems = [f"{len(found[key])} {label} (e.g. {found[key][0]})" for label, key in _DIFFERENCES if found[key]]
    return problems, {key: items[:10] for key, items in found.items() if items}


def describe_base(model: Any) -> str:
    config = model.config
    parts = [getattr(config, "model_type", None) or type(model).__name__]
    for attr, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden")):
        if isinstance(getattr(config, attr, None), int):
            parts.append(f"{getattr(config, attr)} {label}")
    return ", ".join(parts)


def check_base(files: AdapterFiles, config: Any, modules: dict[str, dict[str, Any]], loaded: Any,
               base: str) -> None:
    """AdapterBaseMismatch naming every difference between the adapter and ``loaded``'s model (seen
    through any resident LoRA layers already on it)."""
    problems, details = base_differences(config, modules, UnwrappedView(loaded.model))
    if problems:
        raise errors.AdapterBaseMismatch(
            f"Adapter {files.dir} (trained for {files.base_name or 'an unnamed base'}) does not fit base "
            f"{base} ({describe_base(loaded.model)}): " + "; ".join(problems),
            path=str(files.dir), baseModel=base, adapterBase=files.base_name, **details)


def module_leaf_names(modules: Iterable[str]) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


class UnwrappedView:
    """``get_submodule`` / ``named_modules`` of a model as if no LoRA layer were injected, without
    changing it: a resident already on the base must not hide its Linear layers from the check."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config

    def get_submodule(self, name: str) -> Any:
        module = self.model.get_submodule(name)
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    def named_modules(self) -> Iterable[tuple[str, Any]]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in self.model.named_modules():
            if ".lora_" in name or name.endswith(".base_layer"):
                continue
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            yield name, module
