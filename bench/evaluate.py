"""Loss of trained adapters on the benchmark dataset, computed the same way for every adapter.

"Final loss at equal tokens" compares the two pipelines' adapters after one epoch on the same
tokens. Their logged training losses are not comparable as such (different batch orders, and the
last step's loss is a single noisy batch), so both adapters, and the base model for reference, are
scored here by one piece of code: token-weighted mean cross-entropy over the assistant labels (the
sidecar's ``data.tokenize`` labels: each reply and its ``<|im_end|>``), dropout off, full logits.

Runs in its own process (``python -m bench.evaluate CONFIG OUT``) so the parent stays small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .common import write_json


def evaluate(model_path: str, dataset_path: str, adapters: dict[str, str], *, threads: int,
             batch_size: int = 4, max_seq_length: int = 1024) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidecar import data

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    records = data.load_jsonl(dataset_path)
    items, stats = data.tokenize(records, tokenizer, loss_on="assistant", max_seq_length=max_seq_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))

    def score(model: Any) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(order), batch_size):
                b = data.collate(items, order[i:i + batch_size], pad_id)
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), b.labels[:, 1:].reshape(-1),
                                         ignore_index=data.IGNORE, reduction="sum").item()
                count += b.label_tokens
        return total / count

    losses = {"base_model": score(base)}
    model = None
    for name, path in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
        else:
            model.load_adapter(path, adapter_name=name)
        model.set_adapter(name)
        losses[name] = score(model)
    return {"losses": losses, "label_tokens": stats.trainable_tokens, "tokens": stats.tokens,
            "definition": "token-weighted mean cross-entropy over assistant labels, full dataset, eval mode"}


if __name__ == "__main__":
    cfg = json.loads(Path(sys.argv[1]).read_text())
    write_json(Path(sys.argv[2]), evaluate(cfg["model_path"], cfg["dataset_path"], cfg["adapters"],
                                           threads=cfg["threads"]))
