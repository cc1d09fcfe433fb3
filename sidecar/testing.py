"""Test fixtures that are real but small: a randomly initialised Llama with the real SmolLM2 tokenizer.

The tiny model has the embedded model's exact tokenizer (vocabulary, ChatML template, pad == EOS),
so data and engine tests exercise the real chat template while a forward pass costs milliseconds.

    python -m sidecar.testing tiny-model DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TINY_SEED = 1234


def build_tiny_model(out_dir: Path, *, seed: int = TINY_SEED) -> Path:
    """Write a tiny LlamaForCausalLM checkpoint (safetensors, config, generation config, tokenizer).

    2 layers, hidden 64, 4 heads (2 kv heads), intermediate 128, tied embeddings, seeded weights.
    Returns ``out_dir``. Takes about a second once the SmolLM2 tokenizer has been extracted (the
    first extraction reads the GGUF header, a few seconds, and is cached on disk).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from .models import load_embedded_tokenizer, save_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_embedded_tokenizer()
    ids = _special_ids(tokenizer)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **ids,
    )
    # fork_rng keeps the caller's global RNG state untouched; the seed makes the weights reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.testing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-model", help="write the tiny test model into DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=TINY_SEED)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "tiny-model":
        path = build_tiny_model(args.dir, seed=args.seed)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
