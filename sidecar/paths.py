"""Where things live on disk. Every location can be overridden by an environment variable.

- repository root: the checkout this package runs from (editable install), else the cwd
- ``LORA_SIDECAR_DATA``  data dir, default ``<repo>/.continuum/genome``
- ``LORA_SIDECAR_ENV``   the isolated Python environment, default ``<data>/python``
- ``LORA_SIDECAR_MODEL_CACHE``  converted models, default ``<env>/models``
- adapters default to ``<data>/adapters/<name>-<timestamp>/``
"""

from __future__ import annotations

import os
from pathlib import Path


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
