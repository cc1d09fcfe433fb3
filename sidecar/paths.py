"""Where things live on disk. Every location can be overridden by an environment variable.

- repository root: the checkout this package runs from (editable install), else the cwd
- ``LORA_SIDECAR_DATA``  data dir, default ``<repo>/.continuum/genome``
- ``LORA_SIDECAR_ENV``   the isolated Python environment, default ``<data>/python``
- ``LORA_SIDECAR_MODEL_CACHE``  converted models, default ``<env>/models``
- adapters default to ``<data>/adapters/<name>-<timestamp>/``
- the job journal and each job's params and checkpoints live in ``<data>/jobs/`` (sidecar/journal.py,
  sidecar/jobdir.py)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .files import safe_name


def repo_root() -> Path:
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").is_file() and (here / "sidecar").is_dir():
        return here
    return Path.cwd()


def data_dir() -> Path:
    return Path(os.environ.get("LORA_SIDECAR_DATA") or repo_root() / ".continuum" / "genome")


def env_dir() -> Path:
    return Path(os.environ.get("LORA_SIDECAR_ENV") or data_dir() / "python")


def model_cache_dir() -> Path:
    return Path(os.environ.get("LORA_SIDECAR_MODEL_CACHE") or env_dir() / "models")


def adapters_dir() -> Path:
    return data_dir() / "adapters"


def jobs_dir() -> Path:
    return data_dir() / "jobs"


def job_key(job_id: str) -> str:
    """File-name-safe key of a job id: the id itself when it is safe, else a slug plus a short hash."""
    slug = safe_name(job_id)
    return slug if slug == job_id else f"{slug}-{hashlib.sha256(job_id.encode()).hexdigest()[:10]}"


def job_dir(job_id: str) -> Path:
    """``<data>/jobs/<key>/``: the job's params.json and its checkpoints (its journal entry is ``<key>.json``)."""
    return jobs_dir() / job_key(job_id)
