"""The application's adapter package files, written into every adapter directory the sidecar makes.

The application (its genome layer) reads an adapter directory through three small files of its own,
besides PEFT's: ``manifest.json`` (its adapter package manifest), ``training_metrics.json`` and, for a
job that asked for QLoRA, ``quantization_info.json`` (docs/PROTOCOL.md has an example of each). The
train recipe (training/publish.py) and ``adapters/compose`` call ``write_package`` on their temporary
directory, before the rename that publishes the adapter, so these files appear with the adapter or
not at all. ``training_manifest.json`` / ``compose_manifest.json`` stay the sidecar's own record.

No torch here (the distributed supervisor imports publish, which imports this).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

from ..files import ADAPTER_FILE, atomic_write_text, sha256_file, utc_iso

PACKAGE_MANIFEST = "manifest.json"
METRICS_FILE = "training_metrics.json"
QUANTIZATION_FILE = "quantization_info.json"
PACKAGE_VERSION = 1
PERSONA_FIELDS = ("personaId", "personaName", "traitType")

Source = Literal["trained", "refined", "composed"]


@dataclass(frozen=True)
class PackageInfo:
    """What the package files say about one adapter; every figure comes from the job that made it."""

    source: Source
    base_model: str
    rank: int
    persona_id: Optional[str]
    persona_name: Optional[str]
    trait_type: Optional[str]
    fallback_name: str
    """The package ``name`` when personaName or traitType is missing (the request's name, else the directory's)."""
    epochs: float
    final_loss: Optional[float]
    training_ms: int
    train_runtime_s: float
    loss_history: list[float] = field(default_factory=list)
    examples_processed: int = 0
    dataset_hash: Optional[str] = None
    quantization: Optional[dict[str, Any]] = None
    created_at: float = 0.0


def package_name(persona_name: Optional[str], trait_type: Optional[str], fallback: str) -> str:
    """``{persona slug}-{traitType}``, the persona slug made as the application makes it (lower case,
    every run of other characters one ``-``); ``fallback`` when either is missing."""
    if persona_name and trait_type:
        return f"{re.sub(r'[^a-z0-9]+', '-', persona_name.lower())}-{trait_type}"
    return fallback


def quantization_info(*, requested_bits: int, loaded_bits: Optional[int], compute_dtype: str) -> dict[str, Any]:
    """``quantization_info.json`` of a job that asked for QLoRA: ``enabled`` says whether the base was
    really loaded quantized (without CUDA and bitsandbytes it is not, and the job says so in a warning)."""
    bits = loaded_bits or requested_bits
    return {"enabled": loaded_bits is not None, "bits": bits, "type": "nf4" if bits == 4 else "int8",
            "doubleQuant": False, "computeDtype": compute_dtype}


def inherited_persona(dirs: Iterable[Path | str]) -> dict[str, Optional[str]]:
    """personaId, personaName and traitType that every adapter of ``dirs`` has in its ``manifest.json``
    (a field the manifests disagree on, or one that is missing, is None)."""
    found: dict[str, set] = {k: set() for k in PERSONA_FIELDS}
    any_dir = False
    for d in dirs:
        any_dir = True
        try:
            doc = json.loads((Path(d) / PACKAGE_MANIFEST).read_text())
        except (OSError, ValueError):
            doc = {}
        for k in PERSONA_FIELDS:
            found[k].add(doc.get(k) if isinstance(doc, dict) and isinstance(doc.get(k), str) and doc.get(k) else None)
    return {k: (next(iter(v)) if any_dir and len(v) == 1 else None) for k, v in found.items()}


def _finite(x: Optional[float]) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def metrics_doc(info: PackageInfo) -> dict[str, Any]:
    """``training_metrics.json``: what the application's completion handler reads."""
    return {"finalLoss": _finite(info.final_loss), "lossHistory": [float(x) for x in info.loss_history],
            "trainRuntime": round(info.train_runtime_s, 3), "examplesProcessed": info.examples_processed}


def manifest_doc(info: PackageInfo, directory: Path, *, adapter_id: Optional[str] = None) -> dict[str, Any]:
    """``manifest.json`` for the adapter in ``directory`` (its other files already written: ``sizeMB``
    counts every file there but this one, as the application computes it before writing its own)."""
    metadata: dict[str, Any] = {"epochs": info.epochs, "loss": _finite(info.final_loss),
                                "trainingDuration": info.training_ms}
    if info.dataset_hash:
        metadata["datasetHash"] = info.dataset_hash
    metadata["lossHistory"] = [float(x) for x in info.loss_history]
    metadata["examplesProcessed"] = info.examples_processed
    doc: dict[str, Any] = {
        "id": adapter_id or str(uuid.uuid4()),
        "name": package_name(info.persona_name, info.trait_type, info.fallback_name),
        "traitType": info.trait_type or "",
        "source": info.source,
        "baseModel": info.base_model,
        "rank": info.rank,
        "sizeMB": size_mb(directory),
        "personaId": info.persona_id or "",
        "personaName": info.persona_name or "",
        "trainingMetadata": metadata,
        "contentHash": content_hash(directory),
        "createdAt": utc_iso(info.created_at),
        "version": PACKAGE_VERSION,
    }
    if info.quantization is not None:
        doc["quantization"] = dict(info.quantization)
    return doc


def content_hash(directory: Path | str) -> str:
    """``sha256:`` + the hex digest of the directory's ``adapter_model.safetensors``."""
    return "sha256:" + sha256_file(Path(directory) / ADAPTER_FILE)


def size_mb(directory: Path | str) -> float:
    """Bytes of every file under ``directory`` (``manifest.json`` excluded) in MiB, 2 decimals."""
    root = Path(directory)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p != root / PACKAGE_MANIFEST)
    return round(total / 2**20, 2)


def write_package(directory: Path, info: PackageInfo) -> dict[str, Any]:
    """Write ``training_metrics.json``, ``quantization_info.json`` (when ``info.quantization``) and,
    last, ``manifest.json`` into ``directory`` — a temporary directory the caller renames into place
    (each file written atomically as well). Returns the package manifest."""
    _write_json(directory / METRICS_FILE, metrics_doc(info))
    if info.quantization is not None:
        _write_json(directory / QUANTIZATION_FILE, dict(info.quantization))
    doc = manifest_doc(info, directory)
    _write_json(directory / PACKAGE_MANIFEST, doc)
    return doc


def _write_json(path: Path, doc: Any) -> None:
    # allow_nan=False: NaN/Infinity are not JSON and JSON.parse in the application rejects them.
    atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
