"""Training checkpoints: writing and loading everything a job needs to continue exactly where it was,
on disk whole or not at all. The job directory's layout, ``params.json`` and the listing, locating
and deleting of checkpoints (no torch) are sidecar/jobdir.py's; this module re-exports those names.

A checkpoint is written into ``checkpoint-N.tmp-<pid>/`` (every file fsynced), renamed to
``checkpoint-N`` and the job directory fsynced: the rename is the commit. ``jobdir.read_state``
checks every file's size and sha256.

The data position is (epoch, index of the next batch group): the order of an epoch is a pure
function of (seed, epoch) (``data.epoch_batches``), so a resume never re-reads batches to skip them.

Test hook (tests only): ``LORA_SIDECAR_TEST_CHECKPOINT_PAUSE=<seconds>`` sleeps after the first file
of each checkpoint is written, so a test can kill the process in the middle of a checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .. import errors, wire
from ..files import fsync_dir
from ..jobdir import FORMAT, STATE_FILE, discard, path_for, prune, ref
# The job directory's names, re-exported so callers keep saying ``checkpoint.locate`` and so on.
from ..jobdir import (PARAMS_FILE, PARAMS_FORMAT, PREFIX, clear, discard_job_dir, latest,  # noqa: F401
                      list_checkpoints, load_params, locate, read_state, save_params, step_of)

WEIGHTS_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"

DEFAULT_SECONDS_ENV = "LORA_SIDECAR_CHECKPOINT_SECONDS"
DEFAULT_SECONDS = 600.0
PAUSE_ENV = "LORA_SIDECAR_TEST_CHECKPOINT_PAUSE"


# ---------------------------------------------------------------------------------------------
# When to write
# ---------------------------------------------------------------------------------------------

def default_seconds() -> float:
    value = os.environ.get(DEFAULT_SECONDS_ENV, "").strip()
    if not value:
        return DEFAULT_SECONDS
    try:
        return max(0.0, float(value))
    except ValueError:
        raise errors.InvalidParams(f"{DEFAULT_SECONDS_ENV} must be a number of seconds, not {value!r}") from None


@dataclass(frozen=True)
class Cadence:
    """When a job writes checkpoints: every ``every`` steps and/or after ``seconds`` of training
    since the last one (0 = not by that measure), keeping the newest ``keep``."""

    every: int
    seconds: float
    keep: int

    @classmethod
    def of(cls, params: wire.TrainParams) -> "Cadence":
        every, seconds = params.checkpoint_every, params.checkpoint_seconds
        if every is None and seconds is None:
            seconds = default_seconds()
        return cls(every or 0, float(seconds or 0.0), params.keep_checkpoints)

    @property
    def enabled(self) -> bool:
        return bool(self.every or self.seconds)

    def due(self, step: int, seconds_since_last: float) -> bool:
        return bool((self.every and step % self.every == 0)
                    or (self.seconds and seconds_since_last >= self.seconds))


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """Every generator whose state can change a training result: python, numpy, torch CPU and devices."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        state["mps"] = mps.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> list[str]:
    """Put the generators back; returns warnings for states this machine cannot take (other devices)."""
    import torch

    warnings: list[str] = []
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.append("The checkpoint holds CUDA generator states this machine cannot restore; "
                            "dropout masks after the resume differ from the uninterrupted run.")
    if "mps" in state and getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    return warnings


# ---------------------------------------------------------------------------------------------
# Write and load
# ---------------------------------------------------------------------------------------------

def trainable_tensors(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def write(job_dir: Path, *, step: int, state: dict[str, Any], weights: dict[str, Any],
          optimizer_state: dict[str, Any], rng: dict[str, Any], keep: int,
          protect: Iterable[str] = ()) -> wire.CheckpointRef:
    """Write the checkpoint of ``step`` atomically, then prune to the newest ``keep`` (and ``protect``).

    ``state`` is the loop's JSON-able state (step, data position, totals, histories, fingerprints);
    ``weights`` the LoRA tensors by parameter name and ``optimizer_state`` the optimizer's indexed
    state dict, whole (``World.training_state``); ``rng`` the generator states (``World.gather_rng``).
    An existing checkpoint of the same step (a resumed run passing it again) is replaced.
    """
    import torch
    from safetensors.torch import save as save_safetensors

    job_dir.mkdir(parents=True, exist_ok=True)
    final = path_for(job_dir, step)
    tmp = job_dir / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    pause = float(os.environ.get(PAUSE_ENV) or 0)

    def blob(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    try:
        files = {WEIGHTS_FILE: save_safetensors(weights), OPTIMIZER_FILE: blob(optimizer_state),
                 RNG_FILE: blob(rng)}
        meta: dict[str, dict[str, Any]] = {}
        for i, (name, content) in enumerate(files.items()):
            _write_durable(tmp / name, content)
            meta[name] = {"bytes": len(content), "sha256": _sha256(content)}
            if i == 0 and pause:
                time.sleep(pause)
        doc = {"format": FORMAT, "step": step, "createdAt": time.time(), **state, "files": meta}
        _write_durable(tmp / STATE_FILE, (json.dumps(doc, ensure_ascii=False) + "\n").encode())
        fsync_dir(tmp)
        if final.exists():
            discard(final)
        os.rename(tmp, final)
        fsync_dir(job_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(job_dir, keep, protect=[final.name, *protect])
    return ref(final, doc)


def _sha256(content: bytes) -> str:
    import hashlib

    return hashlib.sha256(content).hexdigest()


def _write_durable(path: Path, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def read_weights(path: Path) -> dict[str, Any]:
    """The checkpoint's LoRA tensors by parameter name."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS_FILE))


def read_training(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(weights, optimizer state, RNG states) of the checkpoint at ``path`` (``World.load_training_state``
    puts the first two into a model; the RNG states go back right before the first step that follows)."""
    import torch

    try:
        return (read_weights(path), torch.load(Path(path) / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
                torch.load(Path(path) / RNG_FILE, map_location="cpu", weights_only=True))
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise errors.CheckpointInvalid(f"Checkpoint {path} cannot be read: {exc}", path=str(path)) from exc


def check_weights(params: dict[str, Any], saved: dict[str, Any], path: Any) -> None:
    """CheckpointInvalid unless ``saved`` holds exactly the job's LoRA tensors, each of its shape."""
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise errors.CheckpointInvalid(
            f"Checkpoint {path} does not fit this job's LoRA layers (missing {missing[:3]}, unexpected {extra[:3]})",
            path=str(path))
    for name, p in params.items():
        if tuple(saved[name].shape) != tuple(p.shape):
            raise errors.CheckpointInvalid(f"Checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                                           f"the job's layer {tuple(p.shape)}", path=str(path))


def copy_weights(model: Any, saved: dict[str, Any], path: Any = "") -> None:
    """Copy whole LoRA tensors into ``model``'s trainable parameters (names and shapes must match)."""
    import torch

    params = trainable_tensors(model)
    check_weights(params, saved, path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
