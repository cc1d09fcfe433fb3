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
- **Checked before anything changes** (fit.py reads the directory and does the checks). An adapter
  whose base differs (a target module absent, other shapes, layers the adapter has no weights for)
  fails with AdapterBaseMismatch naming what differs; kinds that cannot be stacked as
  W + Σ s·(α/r)·B·A (DoRA, lora_bias, embedding LoRA, modules_to_save) fail with AdapterUnsupported.
  Nothing is half loaded.

The tensors are stored in the dtype stock PEFT would give them (the base's dtype, upcast to float32
when the base is float16/bfloat16, as PEFT's ``autocast_adapter_dtype`` does) so that a resident
answers exactly like ``PeftModel.from_pretrained``. ``stack.py`` puts them on the base model (as the
very same tensors: no copy); this module never touches the model's modules.

Only ``summary()`` is called off the job worker (``adapters/list``, ``status``); every other method
runs on the worker. The registry's own state is guarded by a lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from .. import errors, wire
from ..files import safe_name
from . import fit
from .fit import module_leaf_names

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUDGET_ENV = "LORA_SIDECAR_ADAPTER_BUDGET_MB"
DEFAULT_BUDGET_MB = 1024.0
"""1 GiB: about 50 rank-16 adapters of SmolLM2-135M on all seven projections (20 MB each in float32),
or six of a 7B Llama (160 MB each). Small next to the base model the adapters sit on."""


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
    """The ``ModelKey`` of the warm base it is loaded on."""
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
        files = fit.read(path, field=field_name)
        base = base_model or files.base_name
        if base is None:
            raise errors.InvalidParams(f"Adapter {path} does not name its base model (no base_model_name_or_path "
                                       "in adapter_config.json); pass baseModel", field="baseModel")
        config = fit.lora_config(files)
        loaded = models.get(base, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        same = self._same(files, loaded.key, adapter_id, pin)
        if same is not None:
            return LoadOutcome(same, already_loaded=True)

        modules = fit.plain_lora(files)
        fit.check_base(files, config, modules, loaded, base)
        target_dtype = adapter_dtype(loaded.dtype)
        nbytes = sum((p["A"].numel() + p["B"].numel()) * target_dtype.itemsize for p in modules.values())
        victims = self._admit(nbytes, set(protect), str(files.dir))
        for victim in victims:
            self._drop(victim, reason="evicted")
        tensors = _on_device(modules, loaded.device, target_dtype)
        with self._lock:
            rid = adapter_id or self._default_id(files)
            resident = Resident(
                id=rid, path=str(files.dir), sha256=files.sha256, config_sha256=files.config_sha256,
                base_key=loaded.key, base_name=base, base_path=loaded.resolved.path, device=loaded.device,
                config=config, tensors=tensors, rank=int(config.r), alpha=float(config.lora_alpha),
                use_rslora=bool(config.use_rslora), target_modules=module_leaf_names(modules), bytes=nbytes,
                pinned=bool(pin), loaded_at=time.time(), load_ms=round((time.monotonic() - started) * 1000),
                order=next(self._clock), peft_name=f"genome{next(self._names)}")
            self._entries[rid] = resident
        log.info("adapter %s resident (%s, %.1f MiB, %s)%s", rid, files.dir, nbytes / 2**20, loaded.device,
                 f"; evicted {', '.join(v.id for v in victims)}" if victims else "")
        return LoadOutcome(resident, already_loaded=False, evicted=[v.id for v in victims])

    def unload(self, adapter_id: str) -> Resident:
        resident = self.get(adapter_id)
        self._drop(resident, reason="unloaded")
        return resident

    # --- internals ----------------------------------------------------------------------------

    def _same(self, files: fit.AdapterFiles, base_key: Any, adapter_id: Optional[str],
              pin: Optional[bool]) -> Optional[Resident]:
        """The resident with this content on this base (its ``pinned`` set to ``pin`` when given), if
        any; AdapterIdInUse when ``adapter_id`` names another adapter, or this content is resident
        under another id."""
        with self._lock:
            key = (files.sha256, files.config_sha256, base_key)
            same = next((r for r in self._entries.values() if r.identity == key), None)
            if same is not None:
                if adapter_id is not None and adapter_id != same.id:
                    raise errors.AdapterIdInUse(
                        f"This adapter (sha256 {files.sha256[:12]}…) is already resident as {same.id!r}; use that id "
                        f"or unload it first", id=adapter_id, residentId=same.id)
                if pin is not None:
                    same.pinned = pin
                return same
            if adapter_id is not None and adapter_id in self._entries:
                other = self._entries[adapter_id]
                raise errors.AdapterIdInUse(
                    f"Id {adapter_id!r} is taken by another adapter ({other.path}, sha256 {other.sha256[:12]}…); "
                    "unload it first or choose another id", id=adapter_id, residentPath=other.path)
            return None

    def _default_id(self, files: fit.AdapterFiles) -> str:
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


def adapter_dtype(base_dtype: "torch.dtype") -> "torch.dtype":
    """What stock PEFT ends with: the base's dtype, float16/bfloat16 upcast to float32."""
    import torch

    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _on_device(modules: dict[str, dict[str, "torch.Tensor"]], device: str,
               dtype: "torch.dtype") -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    import torch

    where = torch.device(device)
    return {m: (p["A"].to(where, dtype).contiguous(), p["B"].to(where, dtype).contiguous())
            for m, p in modules.items()}
