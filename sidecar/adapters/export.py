"""``adapters/export``: an adapter as a file other runtimes load.

    gguf-lora    a llama.cpp LoRA file (+ an Ollama Modelfile when the base is a .gguf)
    merged       the adapter folded into a full-precision transformers checkpoint
    merged-gguf  the adapter folded into the base .gguf model

``export_adapter`` reads the adapter, finds its base, runs preflight (nothing is written when the
format cannot hold the adapter), writes under a temporary name beside the target and renames it
into place, then records the export in the adapter's ``training_manifest.json`` (rewritten
atomically; adapters without a manifest are exported but not recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import msgspec

from .. import errors, housekeeping, wire
from ..files import MANIFEST_FILE
from . import diskspace, gguf_lora, merge, merge_gguf, preflight
from .gguf_layout import check_against_base, layout_for, read_config
from .source import AdapterSource, BaseModel, read_adapter, resolve_base

log = logging.getLogger(__name__)

EXPORTS_DIR = "exports"


def export_adapter(adapter_dir: str | Path, fmt: str, *, output_path: Optional[str] = None,
                   out_type: Optional[str] = None, overwrite: bool = False, base_model: Optional[str] = None,
                   models: Any = None, claims: Any = None) -> wire.ExportResult:
    """Export the adapter at ``adapter_dir`` as ``fmt`` (see the module docstring).

    ``models``: the server's ModelCache, only consulted to warn when the base is warm in a
    quantized form (merges always read a fresh fp32 copy). ``claims``: the process's
    ``housekeeping.Claims`` (None: none kept), so that the temporary files of an export cut short by
    a crash are removed at the next start. Raises AdapterNotFound, ModelNotFound,
    ExportRefused (preflight), OutputExists, InvalidParams (outType), ExportFailed, OutOfMemory.
    """
    started = time.monotonic()
    if fmt not in preflight.FORMATS:
        raise errors.InvalidParams(f"Unknown export format {fmt!r} (use {', '.join(preflight.FORMATS)})",
                                   field="$.format")
    source = read_adapter(adapter_dir)
    base = resolve_base(source, base_model)
    # a .gguf base (the served model) is laid out from the checkpoint the adapter was trained on
    config, checkpoint = (merge_gguf.gguf_base_config(source, base, fmt) if fmt in preflight.GGUF_FORMATS
                          else (read_config(base), None))
    out_type = out_type or preflight.default_out_type(fmt, config.get("dtype") or config.get("torch_dtype"))
    preflight.check(source, base, config, fmt, out_type)
    warnings = _warnings(source, base, fmt, models)

    layout = _gguf_layout(source, base, config, checkpoint, fmt) if fmt in preflight.GGUF_FORMATS else None
    target = _target(source, fmt, out_type, output_path)
    modelfile = target.with_suffix(".Modelfile") if fmt == "gguf-lora" and base.gguf_path is not None else None
    _check_free(target, overwrite, want_dir=fmt == "merged")
    if modelfile is not None:
        _check_free(modelfile, overwrite)
    diskspace.check(source, base, layout, fmt, out_type, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        for path in filter(None, (target, modelfile)):
            held.enter_context(housekeeping.claiming(claims, *housekeeping.claim_for_export(path), files=True))
        adapted, alpha = _write_atomically(source, base, layout, fmt, out_type, target, modelfile, overwrite)

    files = [_describe(p) for p in _files_of(target)]
    main = max(files, key=lambda f: f.bytes)
    total = sum(f.bytes for f in files)
    if modelfile is not None:
        files.append(_describe(modelfile))
    result = wire.ExportResult(
        format=fmt, adapter_path=str(source.path), output_path=str(target), out_type=out_type, sha256=main.sha256,
        bytes=total, files=files, modelfile_path=str(modelfile) if modelfile else None,
        base_model=base.name, base_gguf=str(base.gguf_path) if base.gguf_path else None, adapted_weights=adapted,
        lora_alpha=alpha, duration_ms=round((time.monotonic() - started) * 1000), warnings=warnings)
    result = msgspec.structs.replace(result, manifest_updated=record_export(source, result))
    log.info("exported %s as %s to %s (%d bytes, %d ms)", source.path, fmt, target, result.bytes, result.duration_ms)
    return result


def _write_atomically(source: AdapterSource, base: BaseModel, layout: Any, fmt: str, out_type: str, target: Path,
                      modelfile: Optional[Path], overwrite: bool) -> tuple[int, Optional[float]]:
    """Write under hidden temporary names beside ``target`` (and ``modelfile``), then rename into place;
    the temporary names are removed whatever happens. Returns (adapted weights, the file's alpha)."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_modelfile = modelfile.with_name(f".{modelfile.name}.tmp-{uuid.uuid4().hex[:8]}") if modelfile else None
    try:
        adapted, alpha = _write(source, base, layout, fmt, out_type, tmp)
        if tmp_modelfile is not None:
            tmp_modelfile.write_text(_modelfile(base.gguf_path, target), encoding="utf-8")
        _fsync(tmp)
        for written, final in ((tmp, target), (tmp_modelfile, modelfile)):
            if written is not None:
                _check_free(final, overwrite, want_dir=written.is_dir())
                _publish(written, final)
        return adapted, alpha
    except errors.SidecarError:
        raise
    except MemoryError as exc:
        raise errors.OutOfMemory(f"Out of memory while exporting {source.path} to {fmt}", format=fmt) from exc
    except Exception as exc:
        log.exception("export of %s to %s failed", source.path, fmt)
        raise errors.ExportFailed(f"Exporting {source.path} to {fmt} failed: {type(exc).__name__}: {exc}",
                                  format=fmt, path=str(target)) from exc
    finally:
        for leftover in filter(None, (tmp, tmp_modelfile)):
            _remove(leftover)


def _gguf_layout(source: AdapterSource, base: BaseModel, config: dict[str, Any], checkpoint: Optional[str],
                 fmt: str) -> Any:
    """The GGUF tensor layout of the base, with every adapted module named in it (else ExportRefused)."""
    layout = layout_for(config, base.gguf_path, fmt)
    targets = preflight.check_modules(source, layout, fmt)
    if base.gguf_path is not None:
        # The checkpoint of a .gguf base (its conversion, or the one the adapter was trained on) lets
        # the row/column order be checked on real weights.
        check_against_base(layout, targets, base.gguf_path, checkpoint, fmt)
    return layout


def _write(source: AdapterSource, base: BaseModel, layout: Any, fmt: str, out_type: str,
           tmp: Path) -> tuple[int, Optional[float]]:
    """Write the export to ``tmp``; (adapted weights, the GGUF LoRA file's alpha or None)."""
    if fmt == "gguf-lora":
        alpha = gguf_lora.file_alpha(source.config)
        return gguf_lora.write(source.pairs, layout, tmp, alpha=alpha, out_type=out_type, name=source.name), alpha
    if fmt == "merged":
        tmp.mkdir()
        merge.write_merged(source, base, tmp, out_type)
        return len(source.pairs), None
    return merge_gguf.write_merged_gguf(source, base, layout, tmp, out_type), None


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def _default_name(fmt: str, out_type: str) -> str:
    return {"gguf-lora": f"lora-{out_type}.gguf", "merged": f"merged-{out_type}",
            "merged-gguf": f"merged-{out_type}.gguf"}[fmt]


def _target(source: AdapterSource, fmt: str, out_type: str, output_path: Optional[str]) -> Path:
    if not output_path:
        return source.path / EXPORTS_DIR / _default_name(fmt, out_type)
    target = Path(output_path).expanduser().absolute()
    if fmt != "merged" and target.is_dir():
        return target / _default_name(fmt, out_type)
    return target


def _check_free(path: Path, overwrite: bool, want_dir: bool = False) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not any(path.iterdir()):
        return  # an empty directory made for us
    if not overwrite:
        raise errors.OutputExists(f"{path} already exists; choose another outputPath or pass overwrite",
                                  path=str(path))
    if path.is_dir() != want_dir:
        raise errors.OutputExists(f"{path} exists and is a {'directory' if path.is_dir() else 'file'}; overwrite "
                                  f"replaces only a {'directory' if want_dir else 'file'} here", path=str(path))


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target (overwrite) is replaced, never left half."""
    if tmp.is_dir():
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _files_of(target: Path) -> list[Path]:
    return sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]


def _describe(path: Path) -> wire.ExportedFile:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return wire.ExportedFile(path=str(path), bytes=path.stat().st_size, sha256=digest.hexdigest())


def _modelfile(base_gguf: Path, lora: Path) -> str:
    return (f"# Ollama: ollama create <name> -f {lora.with_suffix('.Modelfile').name}\n"
            f"# Written by lora-sidecar beside {lora.name}; the adapter only fits this base model.\n"
            f"FROM {base_gguf}\n"
            f"ADAPTER ./{lora.name}\n")


# ---------------------------------------------------------------------------------------------
# Warnings and the manifest
# ---------------------------------------------------------------------------------------------

def _warnings(source: AdapterSource, base: BaseModel, fmt: str, models: Any) -> list[str]:
    warnings = []
    trained_bits = ((source.manifest or {}).get("baseModel") or {}).get("quantizeBits")
    warm_bits = sorted({e.key.quantize_bits for e in (models.entries() if models is not None else [])
                        if e.key.quantize_bits and e.resolved.path == base.hf_path})
    if fmt in ("merged", "merged-gguf") and (trained_bits or warm_bits):
        how = (f"trained on a {trained_bits}-bit quantized base" if trained_bits
               else f"loaded here {warm_bits[0]}-bit quantized")
        warnings.append(f"The base model was {how}; the merge used a fresh full-precision (fp32) copy read from "
                        f"{base.hf_path}, never the quantized weights.")
    if fmt == "gguf-lora" and base.gguf_path is None:
        warnings.append(f"The base {base.name!r} is a transformers checkpoint: load this LoRA in llama.cpp on a "
                        "GGUF conversion of exactly that checkpoint (convert_hf_to_gguf.py).")
    return warnings


def record_export(source: AdapterSource, result: wire.ExportResult) -> bool:
    """Append the export to ``training_manifest.json`` (atomically); False when there is none."""
    manifest_path = source.path / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s is not valid JSON; the export is not recorded", manifest_path)
        return False
    if not isinstance(manifest, dict):
        return False
    target = Path(result.output_path)
    where = str(target.relative_to(source.path)) if target.is_relative_to(source.path) else str(target)
    entry: dict[str, Any] = {
        "format": result.format, "file": where, "sha256": result.sha256, "bytes": result.bytes,
        "outType": result.out_type,
        "createdAt": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    if result.modelfile_path:
        entry["modelfile"] = Path(result.modelfile_path).name
    if result.lora_alpha is not None:
        entry["loraAlpha"] = result.lora_alpha
    exports = [e for e in manifest.get("exports") or [] if isinstance(e, dict) and e.get("file") != where]
    manifest["exports"] = exports + [entry]
    tmp = manifest_path.with_name(f".{MANIFEST_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, manifest_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True
