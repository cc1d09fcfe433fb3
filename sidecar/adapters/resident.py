"""Resident adapters: LoRA adapters kept in memory for a warm base model, under a byte budget.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT writes it)
becomes a ``Resident``: its A/B tensors on the base model's device, checked against that base first.

- **Identity is content.** A resident is the sha256 of its weights file (reported as ``sha256``), the
  sha256 of its config and the base it is loaded on. Loading the same content again is a no-op that
  returns the same id; a file changed on disk at the same path is a new version (a new id by
  default; the old version stays resident until it is unloaded or evicted).
- **Budget.** ``bytes`` are the real bytes of the tensors on the device; their sum stays within
  ``LORA_SIDECAR_ADAPTER_BUDGET_MB``. Loading beyond it evicts the least recently used unpinned
  residents first; when only pinned ones (or ones the same request uses) are left, the load fails
  with AdapterBudgetFull and nothing is evicted.
- **Checked before anything changes.** An adapter whose base differs (a target module absent, other
  shapes, layers the adapter has no weights for) fails with AdapterBaseMismatch naming what differs;
  kinds that cannot be stacked as W + Σ s·(α/r)·B·A (DoRA, lora_bias, embedding LoRA, modules_to_save)
  fail with AdapterUnsupported. Nothing is half loaded.

The tensors are stored in the dtype stock PEFT would give them (the base's dtype, upcast to float32
when the base is float16/bfloat16, as PEFT's ``autocast_adapter_dtype`` does) so that a resident
answers exactly like ``PeftModel.from_pretrained``. ``stack.py`` puts them on the base model (as the
very same tensors: no copy); this module never touches the model's modules.

Only ``summary()`` is called off the job worker (``adapters/list``, ``status``); every other method
runs on the worker. The registry's own state is guarded by a lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from .. import errors, wire
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, safe_name

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUDGET_ENV = "LORA_SIDECAR_ADAPTER_BUDGET_MB"
DEFAULT_BUDGET_MB = 1024.0
"""1 GiB: about 50 rank-16 adapters of SmolLM2-135M on all seven projections (20 MB each in float32),
or six of a 7B Llama (160 MB each). Small next to the base model the adapters sit on."""

PEFT_PREFIX = "base_model.model."
LORA_KEYS = {".lora_A.weight": "A", ".lora_B.weight": "B"}


def budget_from_env() -> int:
    """The budget in bytes from ``LORA_SIDECAR_ADAPTER_BUDGET_MB`` (a number of MiB, fractions allowed)."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return int(DEFAULT_BUDGET_MB * 2**20)
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={text!r} is not a number of MiB (e.g. 1024 or 0.5)") from None
    if not mb > 0:
        raise ValueError(f"{BUDGET_ENV}={text!r} must be positive")
    return int(mb * 2**20)


@dataclass(eq=False)  # identity, not field-by-field (fields hold tensors)
class Resident:
    """One adapter in memory. ``tensors`` maps a module path of the base (``model.layers.0.self_attn.q_proj``)
    to its (A, B): A is (r, in_features), B is (out_features, r)."""

    id: str
    path: str
    sha256: str
    config_sha256: str
    base_key: tuple
    base_name: str
    base_path: str
    device: str
    config: Any
    """peft LoraConfig as stock PEFT reads it from adapter_config.json."""
    tensors: dict[str, tuple["torch.Tensor", "torch.Tensor"]]
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    """Leaf names of the adapted modules (``q_proj``, …)."""
    bytes: int
    pinned: bool
    loaded_at: float
    load_ms: int
    last_used_at: Optional[float] = None
    use_count: int = 0
    order: int = 0
    """LRU clock: higher is more recent (set on load and on every use)."""
    peft_name: str = ""
    """Its name as a PEFT adapter on the base (PEFT names may not contain dots, ids may)."""

    @property
    def identity(self) -> tuple:
        return (self.sha256, self.config_sha256, self.base_key)

    def info(self) -> wire.AdapterInfo:
        return wire.AdapterInfo(
            id=self.id, path=self.path, sha256=self.sha256, bytes=self.bytes, device=self.device,
            pinned=self.pinned, loaded_at=round(self.loaded_at, 3),
            last_used_at=round(self.last_used_at, 3) if self.last_used_at is not None else None,
            use_count=self.use_count, base_model=self.base_name, rank=self.rank, alpha=self.alpha,
            target_modules=self.target_modules)


@dataclass
class LoadOutcome:
    resident: Resident
    already_loaded: bool
    evicted: list[str] = field(default_factory=list)

    def result(self) -> wire.AdaptersLoadResult:
        r = self.resident
        return wire.AdaptersLoadResult(
            id=r.id, path=r.path, sha256=r.sha256, bytes=r.bytes, rank=r.rank, alpha=r.alpha,
            use_rslora=r.use_rslora, target_modules=r.target_modules, base_model=r.base_name, device=r.device,
            pinned=r.pinned, load_ms=r.load_ms, already_loaded=self.already_loaded, evicted=self.evicted)


# ---------------------------------------------------------------------------------------------
# Reading an adapter directory and checking it against a base model
# ---------------------------------------------------------------------------------------------

@dataclass
class AdapterFiles:
    """The two files of an adapter directory, read once (the hash is of exactly the bytes loaded)."""

    dir: Path
    config: dict[str, Any]
    weights: bytes
    sha256: str
    config_sha256: str


def read_adapter_files(path: str, field_name: str = "path") -> AdapterFiles:
    adapter_dir = Path(path).expanduser().absolute()
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_FILE
    if not adapter_dir.is_dir():
        why = "is not a directory" if adapter_dir.exists() else "does not exist"
        raise errors.AdapterNotFound(f"Adapter {path} {why}", path=str(path), field=field_name)
    if not config_path.is_file():
        raise errors.AdapterNotFound(f"Adapter {path} has no {ADAPTER_CONFIG}", path=str(path), field=field_name)
    if not weights_path.is_file():
        other = " (only adapter_model.bin, a pickle: re-save it with safetensors)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise errors.AdapterNotFound(f"Adapter {path} has no {ADAPTER_FILE}{other}", path=str(path),
                                     field=field_name)
    try:
        config_text = config_path.read_bytes()
        weights = weights_path.read_bytes()
        config = json.loads(config_text)
    except (OSError, ValueError) as exc:
        raise errors.AdapterInvalid(f"Adapter {path} cannot be read: {exc}", path=str(path)) from None
    if not isinstance(config, dict):
        raise errors.AdapterInvalid(f"{config_path} is not a JSON object", path=str(path))
    return AdapterFiles(adapter_dir, config, weights, hashlib.sha256(weights).hexdigest(),
                        hashlib.sha256(config_text).hexdigest())


def base_name_of(files: AdapterFiles) -> Optional[str]:
    name = files.config.get("base_model_name_or_path")
    return name if isinstance(name, str) and name.strip() else None


def parse_config(files: AdapterFiles) -> Any:
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


def parse_tensors(files: AdapterFiles) -> dict[str, dict[str, "torch.Tensor"]]:
    """``{module path: {"A": tensor, "B": tensor}}`` from the safetensors bytes (on the CPU)."""
    from safetensors.torch import load as load_safetensors

    path = str(files.dir)
    try:
        flat = load_safetensors(files.weights)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise errors.AdapterInvalid(f"{files.dir / ADAPTER_FILE} cannot be read as safetensors: {exc}",
                                    path=path) from None
    modules: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for key, tensor in flat.items():
        suffix = next((s for s in LORA_KEYS if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            other.append(key)
            continue
        module = key[len(PEFT_PREFIX):-len(suffix)]
        modules.setdefault(module, {})[LORA_KEYS[suffix]] = tensor
    if other:
        kinds = sorted({k.rsplit(".", 2)[-2] if k.count(".") >= 2 else k for k in other})
        raise errors.AdapterUnsupported(
            f"Adapter {path} holds {len(other)} tensors that are not LoRA A/B weights of linear layers "
            f"(e.g. {other[0]}; kinds: {', '.join(kinds[:5])})", path=path, keys=other[:10])
    if not modules:
        raise errors.AdapterInvalid(f"{files.dir / ADAPTER_FILE} holds no LoRA weights", path=path)
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise errors.AdapterInvalid(f"Adapter {path}: {module} has lora_{'A' if 'A' in pair else 'B'} but not "
                                        f"lora_{'B' if 'A' in pair else 'A'}", path=path, module=module)
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise errors.AdapterInvalid(f"Adapter {path}: {module} has lora_A {tuple(a.shape)} and lora_B "
                                        f"{tuple(b.shape)}, which do not chain", path=path, module=module)
    return modules


def expected_rank(config: Any, module: str) -> int:
    from peft.utils.other import get_pattern_key

    if config.rank_pattern:
        key = get_pattern_key(config.rank_pattern.keys(), module)
        return config.rank_pattern.get(key, config.r)
    return config.r


def base_differences(config: Any, modules: dict[str, dict[str, Any]], model: Any) -> tuple[list[str], dict]:
    """What differs between an adapter and a base model; empty when the adapter fits.

    Checked: every adapted module exists in the base and is a Linear layer of the adapter's shape;
    every module the config targets in this base has weights (else PEFT would leave it at its
    initialisation: a sign of a different architecture, e.g. more layers); the ranks in the file match
    the config's (r, rank_pattern)."""
    import torch.nn as nn
    from peft.tuners.tuners_utils import check_target_module_exists

    absent, not_linear, shapes, ranks = [], [], [], []
    for module, pair in sorted(modules.items()):
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            absent.append(module)
            continue
        if not isinstance(layer, nn.Linear):
            not_linear.append(f"{module} ({type(layer).__name__})")
            continue
        r, in_features = pair["A"].shape
        out_features = pair["B"].shape[0]
        if (in_features, out_features) != (layer.in_features, layer.out_features):
            shapes.append(f"{module}: adapter {in_features}→{out_features}, base "
                          f"{layer.in_features}→{layer.out_features}")
        if r != expected_rank(config, module):
            ranks.append(f"{module}: rank {r} in the weights, {expected_rank(config, module)} in the config")
    uncovered = []
    if config.target_modules != "all-linear":
        for name, layer in model.named_modules():
            if name and name not in modules and isinstance(layer, nn.Linear) \
                    and check_target_module_exists(config, name) is True:
                uncovered.append(name)
    problems = []
    details: dict[str, Any] = {}
    for label, items, key in (
            ("target modules absent from the base", absent, "absentModules"),
            ("adapted modules that are not Linear layers in the base", not_linear, "notLinear"),
            ("shape mismatches", shapes, "shapeMismatches"),
            ("modules the config targets in this base but the adapter has no weights for", uncovered,
             "uncoveredModules"),
            ("rank mismatches between weights and config", ranks, "rankMismatches")):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {items[0]})")
            details[key] = items[:10]
    return problems, details


def describe_base(model: Any) -> str:
    config = model.config
    parts = [getattr(config, "model_type", None) or type(model).__name__]
    for attr, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden")):
        if isinstance(getattr(config, attr, None), int):
            parts.append(f"{getattr(config, attr)} {label}")
    return ", ".join(parts)


def adapter_dtype(base_dtype: "torch.dtype") -> "torch.dtype":
    """What stock PEFT ends with: the base's dtype, float16/bfloat16 upcast to float32."""
    import torch

    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def module_leaf_names(modules: Iterable[str]) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

class AdapterRegistry:
    """Resident adapters of every warm base, one budget for all. Torch is imported only when loading."""

    def __init__(self, budget_bytes: Optional[int] = None) -> None:
        self.budget_bytes = budget_from_env() if budget_bytes is None else budget_bytes
        self._lock = threading.Lock()
        self._entries: dict[str, Resident] = {}
        self._clock = itertools.count(1)
        self._names = itertools.count(1)
        self.on_drop: list[Callable[[Resident], None]] = []
        """Called (on the worker) for every resident unloaded or evicted: the stack takes it off the base."""

    # --- reading (any thread) ---------------------------------------------------------------

    def summary(self) -> wire.AdaptersListResult:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda r: r.order)
            return wire.AdaptersListResult(adapters=[r.info() for r in entries], budget_bytes=self.budget_bytes,
                                           used_bytes=sum(r.bytes for r in entries))

    def used_bytes(self) -> int:
        with self._lock:
            return sum(r.bytes for r in self._entries.values())

    def get(self, adapter_id: str, field_name: str = "id") -> Resident:
        with self._lock:
            resident = self._entries.get(adapter_id)
            known = sorted(self._entries)
        if resident is None:
            raise errors.AdapterNotFound(
                f"No resident adapter with id {adapter_id!r}" + (f" (resident: {', '.join(known[:20])})" if known
                                                                  else " (none is resident)"),
                id=adapter_id, field=field_name)
        return resident

    def residents(self) -> list[Resident]:
        with self._lock:
            return list(self._entries.values())

    # --- changing (the worker) --------------------------------------------------------------

    def touch(self, residents: Iterable[Resident]) -> None:
        """Count a use: LRU order, ``lastUsedAt``, ``useCount``."""
        now = time.time()
        with self._lock:
            for r in residents:
                r.order, r.last_used_at, r.use_count = next(self._clock), now, r.use_count + 1

    def load(self, path: str, *, models: Any, adapter_id: Optional[str] = None, pin: Optional[bool] = None,
             base_model: Optional[str] = None, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False, protect: Iterable[str] = (),
             field_name: str = "path") -> LoadOutcome:
        """Make the adapter at ``path`` resident (see the module doc). ``protect``: ids that must not be
        evicted by this load (the other adapters of the same request)."""
        started = time.monotonic()
        files = read_adapter_files(path, field_name)
        base = base_model or base_name_of(files)
        if base is None:
            raise errors.InvalidParams(f"Adapter {path} does not name its base model (no base_model_name_or_path "
                                       "in adapter_config.json); pass baseModel", field="baseModel")
        config = parse_config(files)
        loaded = models.get(base, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        key = (files.sha256, files.config_sha256, loaded.key)

        with self._lock:
            same = next((r for r in self._entries.values() if r.identity == key), None)
            if same is not None:
                if adapter_id is not None and adapter_id != same.id:
                    raise errors.AdapterIdInUse(
                        f"This adapter (sha256 {files.sha256[:12]}…) is already resident as {same.id!r}; use that id "
                        f"or unload it first", id=adapter_id, residentId=same.id)
                if pin is not None:
                    same.pinned = pin
                return LoadOutcome(same, already_loaded=True)
            if adapter_id is not None and adapter_id in self._entries:
                other = self._entries[adapter_id]
                raise errors.AdapterIdInUse(
                    f"Id {adapter_id!r} is taken by another adapter ({other.path}, sha256 {other.sha256[:12]}…); "
                    "unload it first or choose another id", id=adapter_id, residentPath=other.path)

        modules = parse_tensors(files)
        problems, details = base_differences(config, modules, _bare_model(loaded))
        if problems:
            raise errors.AdapterBaseMismatch(
                f"Adapter {files.dir} (trained for {base_name_of(files) or 'an unnamed base'}) does not fit base "
                f"{base} ({describe_base(loaded.model)}): " + "; ".join(problems),
                path=str(files.dir), baseModel=base, adapterBase=base_name_of(files), **details)

        import torch

        target_dtype = adapter_dtype(loaded.dtype)
        nbytes = sum((p["A"].numel() + p["B"].numel()) * torch.empty((), dtype=target_dtype).element_size()
                     for p in modules.values())
        victims = self._admit(nbytes, set(protect), str(files.dir))
        for victim in victims:
            self._drop(victim, reason="evicted")
        device_ = torch.device(loaded.device)
        tensors = {m: (p["A"].to(device_, target_dtype).contiguous(), p["B"].to(device_, target_dtype).contiguous())
                   for m, p in modules.items()}
        now = time.time()
        with self._lock:
            rid = adapter_id or self._default_id(files)
            resident = Resident(
                id=rid, path=str(files.dir), sha256=files.sha256, config_sha256=files.config_sha256,
                base_key=loaded.key, base_name=base, base_path=loaded.resolved.path, device=loaded.device,
                config=config, tensors=tensors, rank=int(config.r), alpha=float(config.lora_alpha),
                use_rslora=bool(config.use_rslora), target_modules=module_leaf_names(modules), bytes=nbytes,
                pinned=bool(pin), loaded_at=now, load_ms=round((time.monotonic() - started) * 1000),
                order=next(self._clock), peft_name=f"genome{next(self._names)}")
            self._entries[rid] = resident
        log.info("adapter %s resident (%s, %.1f MiB, %s)%s", rid, files.dir, nbytes / 2**20, loaded.device,
                 f"; evicted {', '.join(v.id for v in victims)}" if victims else "")
        return LoadOutcome(resident, already_loaded=False, evicted=[v.id for v in victims])

    def unload(self, adapter_id: str) -> Resident:
        resident = self.get(adapter_id)
        self._drop(resident, reason="unloaded")
        return resident

    def clear(self) -> None:
        for resident in self.residents():
            self._drop(resident, reason="cleared")

    # --- internals ----------------------------------------------------------------------------

    def _default_id(self, files: AdapterFiles) -> str:
        stem = f"{safe_name(files.dir.name)[:100]}-{files.sha256[:8]}"
        rid, n = stem, 2
        while rid in self._entries:  # the same file on another base
            rid, n = f"{stem}-{n}", n + 1
        return rid

    def _admit(self, nbytes: int, protect: set[str], what: str) -> list[Resident]:
        """The residents to evict (least recently used first) so that ``nbytes`` more fit; raises
        AdapterBudgetFull, evicting nothing, when they cannot."""
        with self._lock:
            used = sum(r.bytes for r in self._entries.values())
            if nbytes > self.budget_bytes:
                raise errors.AdapterBudgetFull(
                    f"Adapter {what} needs {_mib(nbytes)} on the device, more than the whole adapter budget "
                    f"({_mib(self.budget_bytes)}; set {BUDGET_ENV})", bytes=nbytes, budgetBytes=self.budget_bytes)
            candidates = sorted((r for r in self._entries.values() if not r.pinned and r.id not in protect),
                                key=lambda r: r.order)
            victims = []
            while used + nbytes > self.budget_bytes:
                if not candidates:
                    held = sorted(r.id for r in self._entries.values() if r.pinned or r.id in protect)
                    raise errors.AdapterBudgetFull(
                        f"Adapter {what} needs {_mib(nbytes)} but only {_mib(self.budget_bytes - used)} of the "
                        f"{_mib(self.budget_bytes)} budget is free and every resident adapter left is pinned or used "
                        f"by this request ({', '.join(held)}); unload or unpin one, or raise {BUDGET_ENV}",
                        bytes=nbytes, budgetBytes=self.budget_bytes, usedBytes=used, held=held)
                victim = candidates.pop(0)
                victims.append(victim)
                used -= victim.bytes
            return victims

    def _drop(self, resident: Resident, reason: str) -> None:
        with self._lock:
            if self._entries.get(resident.id) is not resident:
                return
            del self._entries[resident.id]
        for callback in self.on_drop:
            callback(resident)
        log.info("adapter %s %s (%.1f MiB freed)", resident.id, reason, resident.bytes / 2**20)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _bare_model(loaded: Any) -> Any:
    """The base model with any resident LoRA wrappers seen through (``get_base_layer``) for the checks."""
    return _UnwrappedView(loaded.model)


class _UnwrappedView:
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
