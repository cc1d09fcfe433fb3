"""``adapters/compose``: new adapters from resident ones, with PEFT's ``add_weighted_adapter``.

The sources are put on their warm base as PEFT adapters (stack.py), PEFT combines them into a new named
adapter, which is saved into a temporary directory beside the target with a manifest naming its parents
and renamed into place (a crash leaves no half adapter), then deleted from the base again.

Where PEFT would silently do nothing or something else, this module answers ComposeInvalid first:

- ``add_weighted_adapter`` returns without a word when the new name exists: the new adapter always gets
  a fresh internal name here, and a ``name`` already resident is refused before anything runs (``load``).
- linear, ties, dare_linear, dare_ties and magnitude_prune combine the A and B factors themselves, so
  PEFT requires equal ranks; with different target modules they would combine each module from a
  different subset of sources. Both are refused with "use cat or svd" (cat concatenates the factors, svd
  factorises the summed update: exact for any ranks and targets).
- With one source PEFT switches every method to linear: refused except for linear and cat (a rescaled
  copy).
- PEFT builds the new config from the first source's: an rsLoRA first source would give the result
  scaling r/√r instead of 1 (its factors already carry every scaling). The saved config says
  ``use_rslora: false``.
- DoRA sources cannot be resident (resident.py refuses them), so they never reach PEFT here.

``cat`` with weights w gives exactly the stack W + Σ wᵢ·cᵢ·Bᵢ·Aᵢ (rank Σ rᵢ); ``svd`` truncates that sum
to ``svdRank``; the others are PEFT's task-arithmetic approximations (see PEFT's documentation).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__, errors, housekeeping, library_versions, paths, wire
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, atomic_write_text, fsync_dir, safe_name, sha256_file, utc_iso
from . import package
from .fit import module_leaf_names
from .resident import AdapterRegistry, Resident

MANIFEST_FILE = "compose_manifest.json"
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Methods that combine the A and B factors directly: equal ranks and targets needed."""
DENSITY_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune", "magnitude_prune_svd")


def check_params(p: wire.AdaptersComposeParams) -> None:
    """What can be refused before any model work (InvalidParams / ComposeInvalid naming the field)."""
    seen: set[str] = set()
    for k, source in enumerate(p.sources):
        wire.one_of(source, "id", "path", message="Each source needs exactly one of id and path", field=f"$.sources[{k}]")
        key = source.id or str(Path(source.path).expanduser().absolute())
        if key in seen:
            raise errors.InvalidParams(f"Source {key} appears twice", field=f"$.sources[{k}]")
        seen.add(key)
    if p.method in DENSITY_METHODS and p.density is None:
        raise errors.InvalidParams(f"Method {p.method} needs density (the fraction of values kept, 0 < density ≤ 1)",
                                   field="$.density")
    if p.method not in DENSITY_METHODS and p.density is not None:
        raise errors.InvalidParams(f"Method {p.method} does not prune; density applies to "
                                   f"{', '.join(DENSITY_METHODS)}", field="$.density")
    if p.svd_rank is not None and not p.method.endswith("svd"):
        raise errors.InvalidParams(f"svdRank applies to the *svd methods, not {p.method}", field="$.svdRank")
    if len(p.sources) == 1 and p.method not in ("linear", "cat"):
        raise errors.ComposeInvalid(f"With one source PEFT turns {p.method} into linear; use linear or cat to "
                                    "rescale one adapter", field="$.sources", method=p.method)
    if all(source.weight == 0 for source in p.sources):
        raise errors.InvalidParams("Every weight is 0: the result would be the bare base", field="$.sources")


def _output_dir(p: wire.AdaptersComposeParams) -> Path:
    if p.output_path:
        target = Path(p.output_path).expanduser().absolute()
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = paths.adapters_dir().absolute() / f"{safe_name(p.name or 'composed')}-{stamp}"
        n = 2
        while target.exists():
            target, n = target.with_name(f"{target.name.rsplit('~', 1)[0]}~{n}"), n + 1
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise errors.OutputExists(f"Output path {target} already exists and is not empty; choose another "
                                  "outputPath or remove it", path=str(target), field="$.outputPath")
    return target


def _source_ranks(resident: Resident) -> int:
    """The rank PEFT allocates for a source (its largest, with rank_pattern)."""
    config = resident.config
    return max([config.r, *config.rank_pattern.values()]) if config.rank_pattern else config.r


def _check_sources(p: wire.AdaptersComposeParams, sources: list[Resident]) -> None:
    names = [s.id for s in sources]
    if len({s.base_key for s in sources}) > 1:
        bases = ", ".join(f"{s.id}: {s.base_name} ({s.device})" for s in sources)
        raise errors.ComposeInvalid(f"The sources are resident on different base models ({bases})", field="$.sources")
    if p.method in FACTOR_METHODS:
        ranks = [_source_ranks(s) for s in sources]
        if len(set(ranks)) > 1:
            raise errors.ComposeInvalid(
                f"{p.method} combines the LoRA factors directly and needs equal ranks, but the ranks differ ("
                + ", ".join(f"{n}: {r}" for n, r in zip(names, ranks)) + "): use cat or svd",
                field="$.method", ranks=dict(zip(names, ranks)))
        targets = [sorted(s.tensors) for s in sources]
        if any(t != targets[0] for t in targets):
            leaves = ", ".join(f"{n}: {'/'.join(s.target_modules)} ({len(s.tensors)} modules)"
                               for n, s in zip(names, sources))
            raise errors.ComposeInvalid(
                f"{p.method} combines each module's factors and needs the same target modules, but the sources "
                f"adapt different modules ({leaves}): use cat or svd", field="$.method")
    if p.svd_rank is not None:
        smallest = min(min(a.shape[1], b.shape[0]) for s in sources for a, b in s.tensors.values())
        if p.svd_rank > smallest:
            raise errors.ComposeInvalid(f"svdRank {p.svd_rank} exceeds the smallest adapted dimension ({smallest})",
                                        field="$.svdRank")


def compose(p: wire.AdaptersComposeParams, *, models: Any, registry: AdapterRegistry, stack: Any,
            claims: Any = None) -> wire.AdaptersComposeResult:
    """Compose the sources of ``p`` into a new adapter (see the module doc). ``p`` has passed
    ``check_params`` at the door. ``claims``: the process's ``housekeeping.Claims`` (None: none kept),
    so that the temporary directory of a compose cut short by a crash is removed at the next start."""
    started = time.monotonic()
    if p.load and p.name is not None and p.name in {r.id for r in registry.residents()}:
        raise errors.AdapterIdInUse(f"An adapter with id {p.name!r} is already resident; choose another name or "
                                    "unload it first", id=p.name, field="$.name")
    target = _output_dir(p)
    protect = {s.id for s in p.sources if s.id is not None}
    sources, evicted = _resolve_sources(p, models, registry, protect)
    _check_sources(p, sources)
    loaded = base_of(models, sources[0])
    tmp_root = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with housekeeping.claiming(claims, *housekeeping.claim_for_export(target)):  # a crash's leftover is swept
        try:
            out, rank = _combine(p, stack.ensure(loaded, sources), loaded, sources, tmp_root)
            modules = set().union(*(s.tensors for s in sources))
            _simplify_targets(out / ADAPTER_CONFIG, loaded.model, modules)
            loaded.tokenizer.save_pretrained(str(out))
            parents = [wire.ComposeParent(id=s.id, path=s.path, sha256=s.sha256, weight=src.weight, rank=s.rank,
                                          alpha=s.alpha) for s, src in zip(sources, p.sources)]
            manifest = _manifest(p, loaded, sources, parents, target, out / ADAPTER_FILE, rank, modules)
            atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            package.write_package(out, _package_info(p, sources, target, rank, time.monotonic() - started))
            _publish(out, target)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    registry.touch(sources)

    adapter_id = None
    if p.load:
        outcome = registry.load(str(target), models=models, adapter_id=p.name, pin=p.pin,
                                base_model=sources[0].base_name, device=p.device, dtype=p.dtype,
                                trust_remote_code=p.trust_remote_code, protect=protect)
        adapter_id = outcome.resident.id
        evicted += outcome.evicted
    return wire.AdaptersComposeResult(
        adapter_path=str(target), manifest_path=str(target / MANIFEST_FILE), method=p.method, density=p.density,
        rank=rank, target_modules=manifest["adapter"]["targetModules"], sha256=manifest["adapter"]["sha256"],
        bytes=manifest["adapter"]["bytes"], parents=parents, adapter_id=adapter_id, evicted=evicted,
        compose_ms=round((time.monotonic() - started) * 1000))


def _resolve_sources(p: wire.AdaptersComposeParams, models: Any, registry: AdapterRegistry,
                     protect: set[str]) -> tuple[list[Resident], list[str]]:
    """The residents of ``p.sources`` (loading the ones given by path; ``protect`` grows with them) and
    the ids those loads evicted."""
    sources: list[Resident] = []
    evicted: list[str] = []
    for k, source in enumerate(p.sources):
        if source.id is not None:
            sources.append(registry.get(source.id, field_name=f"$.sources[{k}].id"))
        else:
            outcome = registry.load(source.path, models=models, base_model=p.base_model, device=p.device,
                                    dtype=p.dtype, trust_remote_code=p.trust_remote_code, protect=protect,
                                    field_name=f"$.sources[{k}].path")
            sources.append(outcome.resident)
            evicted += outcome.evicted
            protect.add(outcome.resident.id)
        if any(s is sources[-1] for s in sources[:-1]):
            raise errors.InvalidParams(f"Source {sources[-1].id} appears twice (by id and by path)",
                                       field=f"$.sources[{k}]")
    return sources, evicted


def _combine(p: wire.AdaptersComposeParams, state: Any, loaded: Any, sources: list[Resident],
             tmp_root: Path) -> tuple[Path, int]:
    """PEFT's ``add_weighted_adapter`` on the stacked sources, saved under ``tmp_root``; the new adapter
    is deleted from the base again. Returns (its directory, its rank)."""
    import torch

    tuner = state.peft_model.base_model
    internal = f"composed{time.monotonic_ns()}"
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(p.seed)  # dare_* prune at random
            try:
                tuner.add_weighted_adapter(
                    adapters=[s.peft_name for s in sources], weights=[s.weight for s in p.sources],
                    adapter_name=internal, combination_type=p.method, svd_rank=p.svd_rank, density=p.density,
                    majority_sign_method=p.majority_sign_method)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise errors.ComposeInvalid(f"PEFT could not compose these sources with {p.method}: {exc}",
                                            method=p.method) from None
        if internal not in state.peft_model.peft_config:
            raise errors.ComposeInvalid("PEFT's add_weighted_adapter produced no adapter", method=p.method)
        config = state.peft_model.peft_config[internal]
        config.use_rslora = False  # the new factors carry every source's scaling: its own is r/r = 1
        config.base_model_name_or_path = loaded.resolved.path
        if tmp_root.exists():
            shutil.rmtree(tmp_root)
        state.peft_model.save_pretrained(str(tmp_root), selected_adapters=[internal], safe_serialization=True)
    finally:
        if internal in state.peft_model.peft_config:
            state.peft_model.delete_adapter(internal)
            state.refresh()
    return tmp_root / internal, int(config.r)


def _manifest(p: wire.AdaptersComposeParams, loaded: Any, sources: list[Resident], parents: list[wire.ComposeParent],
              target: Path, weights_file: Path, rank: int, modules: set[str]) -> dict[str, Any]:
    return {
        "format": "lora-sidecar.compose-manifest/1",
        "createdAt": utc_iso(time.time()),
        "sidecar": {"version": __version__},
        "libraries": library_versions(),
        "method": p.method, "density": p.density, "svdRank": p.svd_rank,
        "majoritySignMethod": p.majority_sign_method, "seed": p.seed,
        "baseModel": {"name": sources[0].base_name, "path": loaded.resolved.path, "device": loaded.device,
                      "dtype": str(loaded.dtype).removeprefix("torch.")},
        "parents": [wire.to_builtins(parent) for parent in parents],
        "adapter": {"path": str(target), "file": ADAPTER_FILE, "sha256": sha256_file(weights_file),
                    "bytes": weights_file.stat().st_size, "rank": rank, "targetModules": module_leaf_names(modules)},
    }


def _package_info(p: wire.AdaptersComposeParams, sources: list[Resident], target: Path, rank: int,
                  seconds: float) -> package.PackageInfo:
    """The application's package files of a composed adapter (adapters/package.py): nothing was trained
    (epochs 0, loss null, no loss history); the persona fields are those all sources' manifest.json share."""
    persona = package.inherited_persona(s.path for s in sources)
    return package.PackageInfo(
        source="composed", base_model=sources[0].base_name, rank=rank, persona_id=persona["personaId"],
        persona_name=persona["personaName"], trait_type=persona["traitType"], fallback_name=p.name or target.name,
        epochs=0, final_loss=None, training_ms=round(seconds * 1000), train_runtime_s=seconds, loss_history=[],
        examples_processed=0, created_at=time.time())


def _publish(out: Path, target: Path) -> None:
    """Rename the finished adapter into place (an empty directory made for us is replaced)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise errors.OutputExists(f"Output path {target} appeared while composing", path=str(target))
    if target.is_dir():
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(out, target)
    fsync_dir(target.parent)


def base_of(models: Any, resident: Resident) -> Any:
    """The warm base a resident lives on (loaded again if the cache evicted it)."""
    loaded = models.get(resident.base_name, device=resident.device,
                        dtype=str(resident.base_key.dtype).removeprefix("torch."))
    if loaded.key != resident.base_key:
        raise errors.AdapterBaseMismatch(f"The base of adapter {resident.id} ({resident.base_name}) no longer "
                                         "resolves to the model it was loaded on", id=resident.id)
    return loaded


def _simplify_targets(config_path: Path, model: Any, modules: set[str]) -> None:
    """PEFT writes the union of the sources' module paths; write leaf names (``q_proj``, …) instead when
    they select exactly the same modules of this base, as a trained adapter's config does."""
    import torch.nn as nn

    config = json.loads(config_path.read_text())
    leaves = set(module_leaf_names(modules))
    selected = set()
    for name, layer in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if isinstance(base, nn.Linear) and name.rsplit(".", 1)[-1] in leaves:
            selected.add(name)
    if selected == modules:
        config["target_modules"] = sorted(leaves)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
