"""Where base models come from, and the cache that keeps them loaded between jobs.

- ``resolve.py``   model name -> ``ResolvedModel`` (directory, .gguf, hub cache, hub); never loads weights
- ``embedded.py``  the embedded SmolLM2 GGUF converted once, atomically, into a checkpoint; its tokenizer
- ``tokenizer.py`` pad token and chat-template fix-ups, and the fast-loading tokenizer save
- ``devices.py``   device and dtype selection, what this machine offers (``Device``, ``QuantSupport``)
- ``loaded.py``    ``LoadedModel`` (one cache entry's view), its ``ModelKey``, the weights' fingerprint
- ``load.py``      reading one model and tokenizer, failures as sidecar errors
- ``cache.py``     ``ModelCache``: warm models, LRU by count and an optional memory budget

No torch or transformers at import time: ``supports`` must answer fast. Every public name is
re-exported here, so ``from sidecar import models; models.X`` works for all of them.
"""

from .cache import ModelCache
from .devices import (THREADS_ENV, Device, QuantSupport, apply_thread_setting, cpu_has_native_bf16,
                      device_report, dtype_warning, quantization_support, select_device, select_dtype)
from .embedded import (CACHE_FORMAT, EMBEDDED_ALIASES, EMBEDDED_DIRNAME, EMBEDDED_GGUF, EMBEDDED_PACKAGE, MARKER,
                       TOKENIZER_DIRNAME, converted_checkpoint, embedded_checkpoint_dir, embedded_gguf_or_none,
                       embedded_gguf_path, ensure_embedded_checkpoint, load_embedded_tokenizer)
from .load import load_model
from .loaded import LoadedModel, ModelKey, compute_fingerprint
from .resolve import ResolvedModel, hf_cache_dir, hf_offline, resolve_model
from .tokenizer import CHATML_TEMPLATE, ensure_pad_and_template, save_tokenizer

__all__ = [
    "CACHE_FORMAT", "CHATML_TEMPLATE", "EMBEDDED_ALIASES", "EMBEDDED_DIRNAME", "EMBEDDED_GGUF", "EMBEDDED_PACKAGE",
    "MARKER", "THREADS_ENV", "TOKENIZER_DIRNAME",
    "Device", "LoadedModel", "ModelCache", "ModelKey", "QuantSupport", "ResolvedModel",
    "apply_thread_setting", "compute_fingerprint", "converted_checkpoint", "cpu_has_native_bf16",
    "device_report", "dtype_warning", "embedded_checkpoint_dir", "embedded_gguf_or_none", "embedded_gguf_path",
    "ensure_embedded_checkpoint", "ensure_pad_and_template", "hf_cache_dir", "hf_offline",
    "load_embedded_tokenizer", "load_model", "quantization_support", "resolve_model", "save_tokenizer",
    "select_device", "select_dtype",
]
