"""llama.cpp's own quantizer for ``merged-gguf`` out types ``q4_0``, ``q4_k_m``, ``q5_k_m``, ``q6_k``.

gguf-py (the encoders behind ``f32``/``f16``/``bf16``/``q8_0``) has no k-quant encoder, and these
types are not one encoding for every tensor anyway: llama.cpp picks a type per tensor by its name,
layer and shape (``q4_k_m`` gives some ``attn_v``/``ffn_down`` tensors Q6_K, and falls back to
Q5_0/Q8_0 for rows that the 256-wide k-quant blocks do not divide, like SmolLM2's 576). Rewriting
those rules here would drift from the llama.cpp that loads the file, so the file is made by
``llama_model_quantize`` — the function ``llama-quantize`` runs — through llama-cpp-python.

The flow (``merge_gguf.write_quantized``): the merge is written as an unquantized GGUF beside the
output (every tensor dequantized: the base's own quantized tensors exactly, adapted weights as
``base + delta``), quantized from there into the output's temporary name, and the intermediate is
removed whatever happens. ``allow_requantize`` stays off: llama.cpp quantizes each tensor once,
from unquantized values, and a quantized tensor in the intermediate would be an error, never a
silent second rounding.

llama-cpp-python is a --dev dependency (bootstrap ``--dev`` builds it portably): without it these
out types are refused in preflight, before anything is written (``missing``); ``f16``/``q8_0`` need
nothing from it. llama.cpp's log goes to the sidecar's log (stderr) while it quantizes, never to
stdout, and its last lines explain a failure.
"""

from __future__ import annotations

import collections
import ctypes
import logging
from pathlib import Path
from typing import Optional

from .. import errors

log = logging.getLogger(__name__)

FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
"""Out type → llama.cpp's ``llama_ftype`` (its name in llama-cpp-python)."""
OUT_TYPES = tuple(FTYPES)
_GGML_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
INSTALL_HINT = ("install llama-cpp-python into the sidecar's Python: bootstrap/bootstrap.sh --dev (builds it "
                "for portable x86-64), or pip install llama-cpp-python")


def missing() -> Optional[str]:
    """None when llama.cpp's quantizer can be loaded; else why not (the import error)."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError from a library that does not load
        return f"{type(exc).__name__}: {exc}"
    return None if hasattr(llama_cpp, "llama_model_quantize") else "llama_cpp has no llama_model_quantize"


def refusal(fmt: str, out_type: str, why: str) -> errors.ExportRefused:
    return errors.ExportRefused(
        f"Cannot export to {fmt} as {out_type}: out types {', '.join(OUT_TYPES)} are made by llama.cpp's own "
        f"quantizer, which is not available here ({why}). To use them, {INSTALL_HINT}. f32, f16, bf16 and q8_0 "
        "work without it.", format=fmt, reason="no-quantizer", outType=out_type, needs=list(OUT_TYPES))


def quantize(source: Path, target: Path, out_type: str, threads: int) -> None:
    """``llama_model_quantize(source → target)`` as ``out_type`` with ``threads`` threads.

    ``source`` holds only unquantized tensors (f32/f16/bf16). Raises RuntimeError with llama.cpp's
    last log lines when it fails.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = max(1, int(threads))
    params.ftype = getattr(llama_cpp, FTYPES[out_type])
    params.allow_requantize = False
    tail: collections.deque[str] = collections.deque(maxlen=20)
    summary: list[str] = []

    @llama_cpp.llama_log_callback
    def to_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = (text or b"").decode("utf-8", "replace").rstrip()
        if line:
            tail.append(line)
            # ggml's levels: 4 error; the rest (a line per tensor, fallbacks) is detail, summed up below
            log.log(logging.WARNING if level == _GGML_ERROR else logging.DEBUG, "llama.cpp: %s", line)
            if "_quantize_impl: " in line:
                summary.append(line.split("_quantize_impl: ", 1)[1])

    llama_cpp.llama_log_set(to_log, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        _restore_log(llama_cpp)
    if status != 0:
        raise RuntimeError(f"llama.cpp's llama_model_quantize returned {status}: " + " | ".join(list(tail)[-5:]))
    log.info("llama.cpp quantized %s as %s: %s", target.name, out_type, "; ".join(summary[-3:]))


def _restore_log(llama_cpp: object) -> None:
    """Give llama.cpp's log back to llama-cpp-python's own callback (stderr), as after its import."""
    default = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
    llama_cpp.llama_log_set(default, ctypes.c_void_p(0))  # type: ignore[attr-defined]
