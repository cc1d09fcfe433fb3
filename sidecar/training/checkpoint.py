"""Training checkpoints: everything a job needs to continue exactly where it was, on disk whole or
not at all.

A job's directory is ``<data>/jobs/<job key>/`` (``paths.job_dir``)::

    params.json                   the job's TrainParams (outputPath resolved) and its owner process
    checkpoint-00000005/          the state after optimizer step 5
        adapter.safetensors       the trainable (LoRA) tensors by parameter name, bit for bit
        optimizer.pt              AdamW's state_dict (exp_avg, exp_avg_sq, step of every tensor)
        rng.pt                    generator states: python, numpy, torch CPU, CUDA (every device), MPS
        state.json                written last: step, data position, running totals, loss history,
                                  early-stopping state, result fingerprints, size + sha256 of the files
    checkpoint-00000010.tmp-<pid>/   being written; never read
    checkpoint-00000005.old-<pid>/   being deleted; never read

A checkpoint is written into ``checkpoint-N.tmp-<pid>/`` (every file fsynced), renamed to
``checkpoint-N`` and the job directory fsynced: the rename is the commit. A checkpoint is deleted
by renaming it to ``.old-<pid>`` first, so a crash half-way through a delete never leaves a partial
checkpoint under a real name either. The journal's start-up cleanup removes ``.tmp``/``.old``
directories whose process is gone. ``read`` checks every file's size and sha256.

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
from typing import Any, Iterable, Optional

from .. import errors, paths, wire
from ..files import atomic_write_text, fsync_dir, sha256_file

FORMAT = "lora-sidecar.checkpoint/1"
PARAMS_FORMAT = "lora-sidecar.job-params/1"
PARAMS_FILE = "params.json"
STATE_FILE = "state.json"
WEIGHTS_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
PREFIX = "checkpoint-"

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
# The job directory: params and the list of checkpoints (no torch)
# ---------------------------------------------------------------------------------------------

def save_params(job_dir: Path, job_id: str, params: wire.TrainParams) -> None:
    """Write ``params.json`` (atomically, durably): what ``resumeFrom: <jobId>`` continues with."""
    from ..journal import process_identity

    job_dir.mkdir(parents=True, exist_ok=True)
    doc = {"format": PARAMS_FORMAT, "jobId": job_id, "owner": process_identity(),
           "params": wire.to_builtins(params)}
    atomic_write_text(job_dir / PARAMS_FILE, json.dumps(doc, ensure_ascii=False) + "\n")


def load_params(job_dir: Path) -> Optional[dict[str, Any]]:
    """The ``params.json`` document of a job directory, or None when there is none."""
    try:
        doc = json.loads((job_dir / PARAMS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise errors.CheckpointInvalid(f"{job_dir / PARAMS_FILE} cannot be read: {exc}",
                                       path=str(job_dir / PARAMS_FILE)) from None
    if not isinstance(doc, dict) or doc.get("format") != PARAMS_FORMAT or not isinstance(doc.get("params"), dict):
        raise errors.CheckpointInvalid(f"{job_dir / PARAMS_FILE} is not a job params file",
                                       path=str(job_dir / PARAMS_FILE))
    return doc


def step_of(path: Path) -> Optional[int]:
    """The step of a complete-looking checkpoint directory name (``checkpoint-00000005``), else None."""
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def path_for(job_dir: Path, step: int) -> Path:
    return job_dir / f"{PREFIX}{step:08d}"


def list_checkpoints(job_dir: Path) -> list[Path]:
    """Checkpoints of a job, oldest first: committed directories that hold a ``state.json``."""
    try:
        found = [(step_of(p), p) for p in job_dir.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if (p / STATE_FILE).is_file()]


def latest(job_dir: Path) -> Optional[Path]:
    found = list_checkpoints(job_dir)
    return found[-1] if found else None


def read_state(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """``state.json`` of the checkpoint at ``path``; ``verify`` also checks every file's size and sha256."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise errors.CheckpointNotFound(f"{path} is not a checkpoint (no {STATE_FILE})", path=str(path)) from None
    except (OSError, ValueError) as exc:
        raise errors.CheckpointInvalid(f"{path / STATE_FILE} cannot be read: {exc}", path=str(path)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise errors.CheckpointInvalid(f"{path} is not a {FORMAT} checkpoint", path=str(path))
    if verify:
        for name, meta in state["files"].items():
            file = path / name
            if not file.is_file() or file.stat().st_size != meta["bytes"] or sha256_file(file) != meta["sha256"]:
                raise errors.CheckpointInvalid(f"{file} is missing or damaged (size or sha256 differs)",
                                               path=str(path), file=name)
    return state


def ref(path: Path, state: dict[str, Any]) -> wire.CheckpointRef:
    total = sum(m["bytes"] for m in state["files"].values()) + (path / STATE_FILE).stat().st_size
    return wire.CheckpointRef(path=str(path), step=state["step"], bytes=total)


def _discard(path: Path) -> None:
    """Delete a directory so that it never exists half under its real name."""
    if not path.exists():
        return
    doomed = path.with_name(f"{path.name}.old-{os.getpid()}")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(job_dir: Path, keep: int, protect: Iterable[str] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints, never one named in ``protect``."""
    keep_names = set(protect)
    found = list_checkpoints(job_dir)
    for path in found[:max(0, len(found) - keep)]:
        if path.name not in keep_names and str(path) not in keep_names:
            _discard(path)


def clear(job_dir: Path) -> None:
    """Delete every checkpoint of a job directory (a new job reusing the id of an older one)."""
    for path in list_checkpoints(job_dir):
        _discard(path)


def discard_job_dir(job_dir: Path) -> None:
    """Delete a job's directory (params and checkpoints): its completion is journaled, or it is too old."""
    for path in list_checkpoints(job_dir):
        _discard(path)
    shutil.rmtree(job_dir, ignore_errors=True)


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


def write(job_dir: Path, *, step: int, state: dict[str, Any], model: Any, optimizer: Any,
          rng: dict[str, Any], keep: int, protect: Iterable[str] = ()) -> wire.CheckpointRef:
    """Write the checkpoint of ``step`` atomically, then prune to the newest ``keep`` (and ``protect``).

    ``state`` is the loop's JSON-able state (step, data position, totals, histories, fingerprints).
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
        weights = {n: p.detach().to("cpu").contiguous() for n, p in trainable_tensors(model).items()}
        files = {WEIGHTS_FILE: save_safetensors(weights), OPTIMIZER_FILE: blob(optimizer.state_dict()),
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
            _discard(final)
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


def load_weights(model: Any, path: Path) -> None:
    """Copy the checkpoint's trainable tensors into ``model`` (names and shapes must match exactly)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(Path(path) / WEIGHTS_FILE))
    params = trainable_tensors(model)
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise errors.CheckpointInvalid(
            f"Checkpoint {path} does not fit this job's LoRA layers (missing {missing[:3]}, unexpected {extra[:3]})",
            path=str(path))
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise errors.CheckpointInvalid(f"Checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                                               f"the job's layer {tuple(p.shape)}", path=str(path))
            p.copy_(saved[name])


def load_training(model: Any, optimizer: Any, path: Path) -> dict[str, Any]:
    """Restore weights and optimizer state from the checkpoint at ``path``; returns its RNG states
    (restore them with ``restore_rng`` right before the first step that follows)."""
    import torch

    load_weights(model, path)
    try:
        optimizer.load_state_dict(torch.load(Path(path) / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        return torch.load(Path(path) / RNG_FILE, map_location="cpu", weights_only=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise errors.CheckpointInvalid(f"Checkpoint {path} cannot be restored: {exc}", path=str(path)) from exc


def locate(target: str) -> tuple[Optional[Path], Path]:
    """``resumeFrom`` → (checkpoint or None when the job has none yet, its job directory).

    ``target`` is a checkpoint directory, a job directory, or a job id (``<data>/jobs/<key>/``).
    """
    path = Path(target).expanduser()
    if path.is_dir() and (path / STATE_FILE).is_file():
        return path.absolute(), path.absolute().parent
    if path.is_dir() and (path / PARAMS_FILE).is_file():
        return latest(path.absolute()), path.absolute()
    job_dir = paths.job_dir(target)
    if (job_dir / PARAMS_FILE).is_file():
        return latest(job_dir), job_dir
    if path.is_dir() and path.name.startswith(PREFIX):
        raise errors.CheckpointInvalid(f"{path} is an incomplete checkpoint (no {STATE_FILE}); resume from "
                                       "an earlier one", path=str(path))
    raise errors.CheckpointNotFound(
        f"resumeFrom {target!r} is neither a checkpoint directory nor a job with saved state in {paths.jobs_dir()} "
        "(a completed job keeps none; old jobs are cleaned up)", resumeFrom=target)
