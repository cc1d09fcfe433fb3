"""The llama.cpp round trip of tests/test_arch_export.py on a real checkpoint (issue 20, item 4). Opt-in:

    bootstrap/train-wrapper.sh -m pytest -m bigmodel tests/test_bigmodel.py

Without ``-m bigmodel`` (the default test command) it is skipped. With it, it looks in the local
Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; nothing
is downloaded: ``HF_HUB_OFFLINE=1``) for a Qwen3-family or Gemma 3 checkpoint in safetensors —
``LORA_SIDECAR_BIGMODEL`` may name one (a directory or a cached repo id), else the smallest found is
taken — and skips, saying where it looked, when there is none. Then, as for the tiny models: the
GGUF base (f32) written by llama.cpp's converter, one LoRA trained through the sidecar (6 steps) and
exported as a ``gguf-lora`` file, and llama.cpp's teacher-forced log-probabilities with it equal to
PEFT's within ``tolerance(bare gap)``, the bare-base gap of llama.cpp against torch on the same
tokens. A real model's bare gap is larger than a tiny one's (more layers, longer sums), so the
adapter's effect must exceed ``PLANTED_FACTOR`` × the tolerance (not ``EFFECT_FLOOR``): a LoRA that
llama.cpp ignored or misplaced would miss by at least that.

Memory: the f32 conversion, PEFT in fp32 and llama.cpp each hold the model in fp32 (a 0.6B model:
about 2.5 GB each, one at a time); disk: the f32 GGUF.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest

from tests.sidecar_proc import Sidecar
from tests.test_arch_export import PLANTED_FACTOR, gap, round_trip_case, tolerance

pytestmark = pytest.mark.bigmodel

MODEL_TYPES = {"qwen3": "qwen3", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "gemma3": "gemma3",
               "gemma3_text": "gemma3"}
"""The checkpoints' model types (top level or text_config) → the architecture's training targets."""


def find_checkpoint() -> tuple[Optional[tuple[str, Path]], str]:
    """((architecture, snapshot directory) or None, where it looked)."""
    from sidecar.models.resolve import hf_cache_dir

    cache = hf_cache_dir()
    chosen = os.environ.get("LORA_SIDECAR_BIGMODEL")
    if chosen and Path(chosen).is_dir():
        snapshots = [Path(chosen)]
    else:
        pattern = f"models--{chosen.replace('/', '--')}" if chosen else "models--*"
        snapshots = [c.parent for c in cache.glob(f"{pattern}/snapshots/*/config.json")]
    found = []
    for snapshot in snapshots:
        try:
            config = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES and isinstance(config.get("text_config"), dict):
            model_type = config["text_config"].get("model_type")
        weights = list(snapshot.glob("*.safetensors"))
        if model_type in MODEL_TYPES and weights and all(w.exists() for w in weights) and \
                (snapshot / "tokenizer_config.json").exists():  # exists(): the cache's links reach their blobs
            found.append((sum(w.stat().st_size for w in weights), MODEL_TYPES[model_type], snapshot))
    where = f"{chosen or 'any Qwen3 / Qwen3.5 / Gemma 3 checkpoint'} in {cache}"
    return (min(found)[1:] if found else None), where


@pytest.fixture(scope="module")
def checkpoint(request):
    if "bigmodel" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: run with -m bigmodel (a real checkpoint from the local Hugging Face cache)")
    found, where = find_checkpoint()
    if found is None:
        pytest.skip(f"no checkpoint found: looked for {where} (safetensors, config, tokenizer; nothing is "
                    "downloaded). Put one there, e.g. `huggingface-cli download Qwen/Qwen3-0.6B`, or set "
                    "LORA_SIDECAR_BIGMODEL.")
    return found


@pytest.mark.timeout(3600)
def test_gguf_lora_of_a_real_checkpoint_computes_in_llama_cpp_what_peft_computes(checkpoint, tmp_path,
                                                                                   monkeypatch):
    arch, model_dir = checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = Sidecar(env={"HF_HUB_OFFLINE": "1"})
    try:
        case = round_trip_case("big", arch, model_dir, proc, tmp_path, adapters=("one",), timeout=3000)
    finally:
        assert proc.close(timeout=300) == 0
    bare, diff, effect = gap(case, "one", {"lora": str(case.exports["one"])})
    tol = tolerance(bare)
    print(f"{model_dir}: {arch}, {len(case.ids)} tokens, bare {bare:.2e}, adapted max diff {diff:.2e}, "
          f"tolerance {tol:.2e}, effect {effect:.2f} nat; {case.seconds:.0f} s to convert, train and export")
    assert effect > PLANTED_FACTOR * tol, "the adapter barely changes the text: a wrong export would pass"
    assert diff < tol, (diff, tol)
