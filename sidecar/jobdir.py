"""A job's directory on disk: its ``params.json`` and the list of its checkpoints. No torch: the
journal (start-up recovery) and training (writing checkpoints, ``resumeFrom``) both read it.

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

This module is the only writer of ``params.json`` (``save_params``). A checkpoint counts once its
directory has its real name and a ``state.json``; writing one is sidecar/training/checkpoint.py's.
A checkpoint is deleted by renaming it to ``.old-<pid>`` first, so a crash half-way through a delete
never leaves a partial checkpoint under a real name. The journal's start-up cleanup removes
``.tmp``/``.old`` directories whose process is gone. ``read_state`` checks every file's size and sha256.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

from . import errors, paths, wire
from .files import atomic_write_text, fsync_dir, sha256_file
from .procs import process_identity

FORMAT = "lora-sidecar.checkpoint/1"
PARAMS_FORMAT = "lora-sidecar.job-params/1"
PARAMS_FILE = "params.json"
STATE_FILE = "state.json"
PREFIX = "checkpoint-"


# ---------------------------------------------------------------------------------------------
# params.json
# ---------------------------------------------------------------------------------------------

def save_params(job_dir: Path, job_id: str, params: wire.TrainParams) -> None:
    """Write ``params.json`` (atomically, durably): what ``resumeFrom: <jobId>`` continues with, and
    the owner process that start-up cleanup checks before removing a directory without an entry."""
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


# ---------------------------------------------------------------------------------------------
# Listing and reading checkpoints
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Deleting checkpoints
# ---------------------------------------------------------------------------------------------

def discard(path: Path) -> None:
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
            discard(path)


def clear(job_dir: Path) -> None:
    """Delete every checkpoint of a job directory (a new job reusing the id of an older one)."""
    for path in list_checkpoints(job_dir):
        discard(path)


def discard_job_dir(job_dir: Path) -> None:
    """Delete a job's directory (params and checkpoints): its completion is journaled, or it is too old."""
    clear(job_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
