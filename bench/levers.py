"""The lever table: each engine lever switched off (or on) alone, against the engine's defaults.

Runs in one child process (``python -m bench.levers CONFIG OUT``): a short warm-up job loads the
model, then every row is one full ``engine.train`` job on the benchmark dataset. The reference row
runs first and again last, so the table shows how much two identical runs differ (machine noise).

Levers:
- selective logits: the LM head only where labels exist (``LORA_SIDECAR_FULL_LOGITS=1`` turns it off)
- length grouping: ``groupByLength`` batches similar lengths together (less padding)
- gradient checkpointing: off by default (recomputes the forward during backward when on)
- threads: the configured thread count against 1 thread
- bf16 matmuls: on a CPU with native bf16 the default ``dtype`` "auto" multiplies in bf16 over fp32
  weights (sidecar/training/bf16.py); ``dtype`` "float32" turns it off. Off such CPUs the row
  measures nothing (both runs are fp32)
- bf16 weights: ``dtype`` "bfloat16" (weights, residual stream and compute in bf16), for comparison.
  On CPUs without native bf16 this is far slower, so it runs only the first few steps there
- fused LoRA branch: ``LORA_SIDECAR_PEFT_LORA=1`` runs peft's own LoRA forward (bernoulli dropout)
- attention mask: ``LORA_SIDECAR_ATTENTION_MASK=1`` passes the mask even for right-padded batches
- micro-batch budget: ``microBatchTokens: 0`` runs every batch whole (more activation memory)
- all off: full logits + no grouping + checkpointing, the stock-Hugging-Face-like loop
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from .common import JobSettings, write_json
from .inproc import env_var, torch_threads, train_once

FULL_LOGITS_ENV = "LORA_SIDECAR_FULL_LOGITS"
SWITCH_ENVS = (FULL_LOGITS_ENV, "LORA_SIDECAR_PEFT_LORA", "LORA_SIDECAR_ATTENTION_MASK")
THREADS_ENV = "LORA_SIDECAR_THREADS"  # the engine applies it at the start of every job
BF16_STEPS = 3


def rows(settings: JobSettings) -> list[dict[str, Any]]:
    """(name, lever, change, env, threads, steps) of every measured run, in run order."""
    from sidecar.models import cpu_has_native_bf16

    t = settings.threads
    few = min(BF16_STEPS, settings.max_steps or BF16_STEPS)
    native = cpu_has_native_bf16()
    r: list[dict[str, Any]] = [
        {"name": "reference", "lever": "engine defaults", "change": {}},
        {"name": "full_logits", "lever": "selective logits", "change": {}, "env": {FULL_LOGITS_ENV: "1"}},
        {"name": "no_grouping", "lever": "length grouping", "change": {"groupByLength": False}},
        {"name": "checkpointing_on", "lever": "gradient checkpointing", "change": {"gradientCheckpointing": True}},
        {"name": "peft_lora", "lever": "fused LoRA branch", "change": {}, "env": {"LORA_SIDECAR_PEFT_LORA": "1"}},
        {"name": "attention_mask", "lever": "no attention mask on right-padded batches", "change": {},
         "env": {"LORA_SIDECAR_ATTENTION_MASK": "1"}},
        {"name": "no_micro_split", "lever": "micro-batch token budget (512)", "change": {"microBatchTokens": 0}},
    ]
    if t > 1:
        r.append({"name": "threads_1", "lever": f"threads ({t} → 1)", "change": {}, "threads": 1})
    r += [
        {"name": "all_off", "lever": "all of the above off (stock HF-like loop)",
         "change": {"groupByLength": False, "gradientCheckpointing": True}, "env": {FULL_LOGITS_ENV: "1"}},
        {"name": "fp32_matmuls", "lever": "bf16 matmuls over fp32 weights (dtype auto; off: dtype float32)",
         "change": {"dtype": "float32"}},
        {"name": "bf16_weights", "lever": "bf16 weights and compute (dtype bfloat16), not a default",
         "change": {"dtype": "bfloat16"}, **({} if native else {"steps": few})},
        {"name": "reference_repeat", "lever": "engine defaults, run again (noise)", "change": {}},
    ]
    return r


def run_levers(settings: JobSettings, workdir: Path) -> dict[str, Any]:
    from sidecar.models import ModelCache

    import torch

    torch.set_num_threads(settings.threads)
    models = ModelCache(max_models=2)
    base = settings.train_params("unused")
    base.pop("outputPath")
    train_once({**base, "maxSteps": 2}, models, workdir, "lever-warmup")
    out = []
    for row in rows(settings):
        params = dict(base, **row["change"])
        steps = row.get("steps") or settings.max_steps
        if steps is not None:
            params["maxSteps"] = steps
        envs = row.get("env", {})
        threads = row.get("threads", settings.threads)
        with contextlib.ExitStack() as stack:
            for name in SWITCH_ENVS:
                stack.enter_context(env_var(name, envs.get(name)))
            stack.enter_context(env_var(THREADS_ENV, str(threads)))
            stack.enter_context(torch_threads(threads))
            print(f"lever run {row['name']} ...", file=sys.stderr, flush=True)
            r = train_once(params, models, workdir, f"lever-{row['name']}")
            r["torch_threads_after"] = torch.get_num_threads()
        out.append({**row, **r, "threads": threads, "steps_limit": row.get("steps")})
        print(f"  {row['name']}: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    return gains(out)


def gains(out: list[dict[str, Any]]) -> dict[str, Any]:
    """Each lever's gain: the mean of the two reference runs over the row's tokens/s (full-epoch rows
    only; a row cut to a few steps, ``steps_limit``, is not comparable)."""
    by = {r["name"]: r for r in out}
    ref = (by["reference"]["tokens_per_s"] + by["reference_repeat"]["tokens_per_s"]) / 2
    for r in out:
        r["speedup_of_lever"] = ref / r["tokens_per_s"] if r["tokens_per_s"] and not r.get("steps_limit") else None
    return {"reference_tokens_per_s": ref,
            "noise": abs(by["reference"]["tokens_per_s"] - by["reference_repeat"]["tokens_per_s"]) / ref,
            "rows": out}


if __name__ == "__main__":
    cfg = json.loads(Path(sys.argv[1]).read_text())
    settings = JobSettings.from_dict(cfg["settings"])
    write_json(Path(sys.argv[2]), run_levers(settings, Path(cfg["workdir"])))
