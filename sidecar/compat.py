"""One-shot training from an old ``peft-train.py`` JSON config, for scripts written for that pipeline.

``lora-sidecar train --config config.json --output DIR`` reads the old keys (``baseModel``,
``datasetPath``, ``rank``, ``alpha``, ``epochs``, ``learningRate``, ``batchSize``, ``outputDir``,
``quantize``, ``quantizeBits``), runs the same engine as the sidecar, writes the same outputs, logs
progress on stderr and prints on stdout the application's step-bridge lines (JSON step and checkpoint
events, ``MEMORY_REPORT:`` lines; sidecar/compat_events.py), ending with ``Final loss: X.XXXX``; Python
writes to ``sys.stdout`` during the job go to stderr. Any other key that is a ``train``
parameter (camelCase, e.g. ``maxSeqLength``) is honoured too; unknown keys are reported and ignored.
Exit code 0 on success, 1 on any error (message on stderr), 130 when interrupted.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import msgspec

from . import errors, wire

# Old key → TrainParams wire name, where they differ.
_RENAMED = {"outputDir": "outputPath"}
_TRAIN_FIELDS = {f.encode_name for f in msgspec.structs.fields(wire.TrainParams)}
_INLINE_ONLY = {"dataset", "validationDataset"}  # an old config never carries data inline


def params_from_config(config: dict[str, Any], *, output_dir: Optional[str], base_dir: Path) -> tuple[wire.TrainParams, list[str]]:
    """Map an old config to TrainParams; returns the params and the keys that were ignored."""
    mapped: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in config.items():
        name = _RENAMED.get(key, key)
        if name in _TRAIN_FIELDS and name not in _INLINE_ONLY:
            mapped[name] = value
        else:
            ignored.append(key)
    if output_dir is not None:
        mapped["outputPath"] = output_dir
    if not mapped.get("outputPath"):
        raise errors.InvalidParams("No output directory: pass --output DIR or set outputDir in the config",
                                   field="outputDir")
    for key in ("datasetPath", "validationPath"):
        value = mapped.get(key)
        if isinstance(value, str) and not Path(value).expanduser().is_absolute() \
                and not Path(value).exists() and (base_dir / value).exists():
            mapped[key] = str(base_dir / value)  # relative to the config file, as a fallback to the cwd
    if "quantizeBits" in mapped and "quantize" not in mapped:
        mapped["quantize"] = True
    return wire.decode_params(mapped, wire.TrainParams), ignored


def _progress_line(p: wire.Progress) -> str:
    parts = [f"[{p.phase}]"]
    if p.total_steps:
        parts.append(f"step {p.step}/{p.total_steps}")
        parts.append(f"epoch {p.epoch:.2f}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.validation_loss is not None:
        parts.append(f"val_loss {p.validation_loss:.4f}")
    if p.learning_rate is not None:
        parts.append(f"lr {p.learning_rate:.2e}")
    if p.tokens_per_second:
        parts.append(f"{p.tokens_per_second:.0f} tok/s")
    if p.eta_seconds is not None:
        parts.append(f"eta {p.eta_seconds:.0f}s")
    if p.message:
        parts.append(p.message)
    return " ".join(parts)


def _read_config(path: Path, config_path: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise errors.InvalidParams(f"Config file {config_path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.InvalidParams(f"Config file {config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise errors.InvalidParams(f"Config file {config_path} must hold a JSON object")
    return config


def run_config(config_path: str, output_dir: Optional[str] = None) -> int:
    """Train from an old ``peft-train.py`` config. ``output_dir`` (``--output``) wins over ``outputDir``."""
    received_at = time.time()
    stop = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        print("Interrupted: stopping after the current micro-batch", file=sys.stderr, flush=True)
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupt) if threading.current_thread() is threading.main_thread() else None
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the event lines only
    try:
        path = Path(config_path).expanduser()
        params, ignored = params_from_config(_read_config(path, config_path), output_dir=output_dir,
                                             base_dir=path.parent.absolute())
        if ignored:
            print(f"Ignoring unknown config keys: {', '.join(sorted(ignored))}", file=sys.stderr, flush=True)

        from .compat_events import EventLines
        from .models import ModelCache
        from .models.devices import select_device
        from .training import train
        from .training.checks import check_request
        from .training.state import memory_now

        params = check_request(params)  # this command is its own door: the server's checks, once
        job_id = params.job_id or f"train-{uuid.uuid4().hex[:12]}"
        last = {"line": None, "at": 0.0}
        events = EventLines(out, select_device(params.device))

        def report(p: wire.Progress) -> None:
            events.progress(p)
            line = _progress_line(p)
            now = time.monotonic()
            # Every step on a tiny run, at most ~4 lines a second on a fast one; phase changes always.
            if line != last["line"] and (now - last["at"] >= 0.25 or "step" not in line or p.step == p.total_steps):
                print(line, file=sys.stderr, flush=True)
                last["line"], last["at"] = line, now

        result = train(params, job_id=job_id, models=ModelCache(max_models=1), report=report,
                       should_stop=stop.is_set, received_at=received_at)
        for warning in result.warnings:
            print(f"Warning: {warning}", file=sys.stderr, flush=True)
        m = result.metrics
        print(f"Adapter: {result.adapter_path}", file=sys.stderr)
        print(f"Steps: {m.steps}, epochs: {m.epochs:g}, tokens/s: {m.tokens_per_second:.1f}, "
              f"train loss: {m.train_loss:.4f}" + (f", validation loss: {m.validation_loss:.4f}"
                                                   if m.validation_loss is not None else ""), file=sys.stderr)
        sys.stderr.flush()
        events.final(m.final_loss, memory_now())
        return 0
    except errors.RequestCancelled:
        print("Training cancelled; no adapter was written", file=sys.stderr, flush=True)
        return 130
    except errors.SidecarError as exc:
        detail = f" ({json.dumps(exc.data)})" if exc.data else ""
        print(f"Error: {exc.message}{detail}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # the old script's contract: a message and exit code 1, not a traceback
        print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        sys.stdout = out
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
