"""Tiny random checkpoints of the architectures the sidecar serves, built from transformers configs.

``build(arch, out_dir)`` writes a 4-layer, hidden-64 model of ``arch`` (safetensors, config,
generation config) with the SmolLM2 tokenizer of the embedded model, extended by the special tokens
of the architecture's chat format and carrying that architecture's chat template — the template as
llama.cpp's source release ships it (``models/templates``, fetched and cached by
``tests.llamacpp_convert``; nothing is copied into this repository), or for Gemma 3, which it does
not ship, a template written here in Gemma 3's turn format.

Architectures (``ARCHS``): qwen3_5, qwen3, gemma3, phi3, mistral, llama, qwen2.

- qwen3_5: layers 0-2 are linear attention (Gated DeltaNet, 2 key heads and 4 value heads, so
  llama.cpp's value-head reordering is not the identity), layer 3 full attention with the gated
  query; ``rope_parameters`` carries an ``mrope_section`` summing to half the rotary dimension.
  ``vision=True`` writes the image-text shape of the released checkpoints:
  ``Qwen3_5ForConditionalGeneration`` with a tiny vision tower, text weights under
  ``model.language_model.``.
- gemma3: the text model (``Gemma3ForCausalLM``), sliding-window layers in transformers' default
  pattern (llama.cpp hard-codes that pattern), ``query_pre_attn_scalar`` = head_dim (what llama.cpp
  scales by).
- phi3: fused ``qkv_proj`` and ``gate_up_proj``; the tokenizer config names ``GPT2Tokenizer`` (as
  Phi-4's does) so that llama.cpp's converter reads the BPE vocabulary rather than a SentencePiece
  model the SmolLM2 tokenizer does not have.

In tests, ``cached(tmp_path_factory, arch)`` builds each model once per session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

ARCHS = ("qwen3_5", "qwen3", "gemma3", "phi3", "mistral", "llama", "qwen2")
HIDDEN = 64
LAYERS = 4

# Gemma 3's turn format: a system message is folded into the first user turn; the assistant role
# is called "model". Written here because llama.cpp's release ships no Gemma 3 template.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# arch -> (template file in llama.cpp's models/templates or None for GEMMA3_TEMPLATE,
#          special tokens to add, bos, eos); STOP: further end-of-turn tokens in the generation config
FORMATS: dict[str, tuple[str | None, tuple[str, ...], str, str]] = {
    "qwen3_5": ("Qwen3.5-4B.jinja", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
                "<|im_start|>", "<|im_end|>"),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", (), "<|im_start|>", "<|im_end|>"),
    "qwen2": ("Qwen-Qwen2.5-7B-Instruct.jinja", (), "<|im_start|>", "<|im_end|>"),
    "gemma3": (None, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>"),
    # <s>, </s>, <unk>: Phi-3's own vocabulary has them, and llama.cpp's vocabulary loader looks them
    # up by name for a model named phi3
    "phi3": ("microsoft-Phi-3.5-mini-instruct.jinja",
             ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<s>", "</s>", "<unk>"),
             "<|endoftext|>", "<|endoftext|>"),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>"),
    "llama": ("meta-llama-Llama-3.1-8B-Instruct.jinja",
              ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
              "<|begin_of_text|>", "<|eot_id|>"),
}
STOP = {"gemma3": "<end_of_turn>", "phi3": "<|end|>"}


def tokenizer_for(arch: str) -> Any:
    """The SmolLM2 tokenizer with ``arch``'s special tokens, BOS/EOS/pad and chat template."""
    from sidecar.models import load_embedded_tokenizer

    from .llamacpp_convert import chat_template

    template_file, extra, bos, eos = FORMATS[arch]
    tokenizer = load_embedded_tokenizer()
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    tokenizer.chat_template = GEMMA3_TEMPLATE if template_file is None else chat_template(template_file)
    return tokenizer


def _ids(tokenizer: Any) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _common(vocab: int) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def qwen3_5_text_config(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import Qwen3_5TextConfig

    # head_dim 32 × partial_rotary_factor 0.25 = 8 rotary dims: mrope_section sums to 4
    return Qwen3_5TextConfig(
        **_common(vocab), head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        tie_word_embeddings=False, **ids)


def _qwen3_5(tokenizer: Any, ids: dict[str, int], vision: bool) -> Any:
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    text = qwen3_5_text_config(len(tokenizer), ids)
    if not vision:
        return Qwen3_5ForCausalLM(text)
    token = tokenizer.convert_tokens_to_ids
    config = Qwen3_5Config(
        text_config=text.to_dict(),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN,
                           num_position_embeddings=16),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=False)
    return Qwen3_5ForConditionalGeneration(config)


def _dense(arch: str) -> Callable[[Any, dict[str, int], bool], Any]:
    def make(tokenizer: Any, ids: dict[str, int], vision: bool) -> Any:
        import transformers as tf

        vocab = len(tokenizer)
        if arch == "qwen3":
            return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(vocab), head_dim=16, tie_word_embeddings=True, **ids))
        if arch == "qwen2":
            return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common(vocab), tie_word_embeddings=True, **ids))
        if arch == "llama":
            return tf.LlamaForCausalLM(tf.LlamaConfig(**_common(vocab), tie_word_embeddings=True, **ids))
        if arch == "mistral":
            return tf.MistralForCausalLM(tf.MistralConfig(**_common(vocab), head_dim=16, sliding_window=None,
                                                          tie_word_embeddings=False, **ids))
        if arch == "phi3":
            return tf.Phi3ForCausalLM(tf.Phi3Config(**_common(vocab), original_max_position_embeddings=2048,
                                                    tie_word_embeddings=False, **ids))
        if arch == "gemma3":
            return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_common(vocab), head_dim=16, query_pre_attn_scalar=16,
                                                            sliding_window=512, tie_word_embeddings=True, **ids))
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    return make


def build(arch: str, out_dir: Path, *, vision: bool = False, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` checkpoint with its tokenizer into ``out_dir``; return ``out_dir``.

    ``vision`` is only for qwen3_5 (the image-text checkpoint shape). Weights are seeded; the
    caller's RNG state is left untouched. About a second per model on two cores.
    """
    import torch
    from transformers import GenerationConfig

    from sidecar.models import save_tokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    if vision and arch != "qwen3_5":
        raise ValueError("vision=True is only built for qwen3_5")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(arch)
    ids = _ids(tokenizer)
    make = (lambda t, i, v: _qwen3_5(t, i, v)) if arch == "qwen3_5" else _dense(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make(tokenizer, ids, vision)
    if arch in STOP:  # as the released models: generation stops at the end of a turn too
        ids = {**ids, "eos_token_id": [tokenizer.convert_tokens_to_ids(STOP[arch]), ids["eos_token_id"]]}
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    if arch == "phi3":
        _set_tokenizer_class(out_dir, "GPT2Tokenizer")
    return out_dir


def _set_tokenizer_class(out_dir: Path, name: str) -> None:
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_CACHE: dict[tuple[int, str, bool, int], Path] = {}


def cached(tmp_path_factory: Any, arch: str, *, vision: bool = False, seed: int = 0) -> Path:
    """``build`` once per pytest session (keyed by the session's ``tmp_path_factory``). Read-only."""
    key = (id(tmp_path_factory), arch, vision, seed)
    if key not in _CACHE:
        name = f"{arch}{'-vision' if vision else ''}-{seed}"
        _CACHE[key] = build(arch, tmp_path_factory.mktemp(name), vision=vision, seed=seed)
    return _CACHE[key]
