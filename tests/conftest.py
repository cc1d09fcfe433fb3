"""Shared fixtures. The tiny model is built once per session; it carries the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama checkpoint (safetensors) with the SmolLM2 tokenizer.

    Treat it as read-only: it is shared by every test in the session.
    """
    from sidecar.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
