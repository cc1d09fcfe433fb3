"""Reference computations shared by the genome and architecture tests: a stack of adapters merged by
hand into a copy of the base (no PEFT), and comparisons of generated answers."""

from __future__ import annotations

import json
import math
from pathlib import Path


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def assert_same_answer(batched: dict, single: dict, tol: float = 1e-4) -> None:
    """Token for token, logprobs within ``tol``; a divergence is allowed only at a near tie (the two
    different tokens' log-probabilities within ``tol``), after which the rest cannot be compared."""
    for t, (x, y) in enumerate(zip(batched["tokenIds"], single["tokenIds"])):
        assert abs(batched["logprobs"][t] - single["logprobs"][t]) < tol, (t, batched, single)
        if x != y:
            return  # a near tie: both picks as likely within tol
    assert batched["tokenIds"] == single["tokenIds"], (batched, single)


def own_logprobs(model_dir: Path, stack: list[tuple[Path, float]], question: str, token_ids: list[int]) -> list[float]:
    """Log-probabilities of ``token_ids`` after ``question`` under W + Σ scale·c·B·A, merged by hand into a
    copy of the base (c = α/r, or α/√r for rsLoRA): plain torch and safetensors, no PEFT."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for adapter, scale in stack:
            config = json.loads((Path(adapter) / "adapter_config.json").read_text())
            rank = config["r"]
            c = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
            tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
            for key, a in tensors.items():
                if key.endswith(".lora_A.weight"):
                    b = tensors[key.replace(".lora_A.", ".lora_B.")]
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    model.get_submodule(module).weight += scale * c * (b @ a)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + token_ids])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0].tolist()
