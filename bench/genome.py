"""The genome benchmark: exam batches against single calls, and the cost of stacked adapters.

    bootstrap/train-wrapper.sh -m bench --genome [--quick] [--threads N]

One warm sidecar over stdio, on the embedded SmolLM2-135M-Instruct, with four rank-16 adapters (α 32,
the seven projections, random A and B made with stock PEFT: the cost does not depend on what an
adapter learned) made resident with ``adapters/load``:

1. **Exam vs single calls**: 10 questions × 2 variants (bare base, base + adapter 1) as one
   ``generate`` request, against the same 20 answers asked one request at a time (resident adapter by
   id, so no disk). Both greedy, same ``maxNewTokens``; the answers are compared token for token.
2. **Stacked adapters**: one request (a story, so every row generates ``maxNewTokens``) answered by the
   bare base and with 1, 2 and 4 adapters stacked (each at scale 1/k), rounds interleaved so that
   machine noise hits every row alike; the median milliseconds per generated token (prompt included in
   the time) of each, and its ratio to the bare base.
3. **Where a single adapter's cost goes**: the first use of a resident on the base (PEFT injects it),
   later uses (already on the base), and the legacy ``adapterPath`` (read from disk per call).

Every figure is wall time seen by the client. Compare figures within one run only: the machine may be
shared.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, REPO, tail, thread_env, write_json

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Who wrote Romeo and Juliet?", "Give me a synonym for happy.", "What is the boiling point of water?",
             "How many legs does a spider have?", "What language is spoken in Brazil?",
             "Name a planet in our solar system.", "What do bees make?"]
TARGET = "exam of 10 prompts × 2 variants ≥ 3 × faster than the 20 single calls"
STORY = "Write a short story about a dragon who learns to fly."
"""The stacked-adapter rows' question: its answers run to maxNewTokens, so rows generate alike."""


def make_adapters(base_path: str, out: Path, n: int = 4, rank: int = 16) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .common import TARGET_MODULES

    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        torch.manual_seed(1000 + i)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES,
                                                      lora_dropout=0.0))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        path = out / f"adapter{i + 1}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def _timed(client: Any, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = client.call("generate", params, timeout=3600)
    return time.perf_counter() - started, result


def run(*, threads: int, quick: bool = False, out: Path | None = None, workdir: Path | None = None) -> dict[str, Any]:
    import os

    from sidecar.client import SidecarClient
    from sidecar.models import resolve_model

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or BENCH_DIR / "results" / f"genome-{stamp}.json"
    workdir = workdir or Path(tempfile.mkdtemp(prefix="lora-bench-genome-"))
    max_new = 16 if quick else 32
    rounds = 2 if quick else 5

    def say(msg: str) -> None:
        print(f"[bench genome {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    base = resolve_model("default").path
    say(f"making 4 random rank-16 adapters for {base}")
    adapters = make_adapters(base, workdir)
    res: dict[str, Any] = {"format": "lora-sidecar.bench-genome/1", "started_at": stamp, "threads": threads,
                           "load_average_start": os.getloadavg()[0], "max_new_tokens": max_new,
                           "command": "python -m bench --genome" + (" --quick" if quick else ""), "out": str(out)}
    log_path = workdir / "sidecar.log"
    with open(log_path, "wb") as log:
        client = SidecarClient([str(REPO / "bootstrap" / "train-wrapper.sh"), "-m", "sidecar"],
                               env=thread_env(threads), stderr=log)
        try:
            ids = [client.call("adapters/load", {"path": str(p), "baseModel": "default"}, timeout=600)["id"]
                   for p in adapters]
            ask = {"baseModel": "default", "maxNewTokens": max_new}
            one = [{"role": "user", "content": QUESTIONS[0]}]

            say("single adapter: first use (injection), later uses, adapterPath from disk")
            t_bare_first, _ = _timed(client, {**ask, "messages": one})  # warms the model
            t_first, _ = _timed(client, {**ask, "messages": one, "adapters": [{"id": ids[0]}]})
            again = [_timed(client, {**ask, "messages": one, "adapters": [{"id": ids[0]}]})[0] for _ in range(rounds)]
            disk = [_timed(client, {**ask, "messages": one, "adapterPath": str(adapters[0])})[0]
                    for _ in range(rounds)]
            # The legacy path took the residents off the base; put them back before measuring more.
            for rid in ids:
                client.call("generate", {**ask, "messages": one, "maxNewTokens": 1, "adapters": [{"id": rid}]})
            bare = [_timed(client, {**ask, "messages": one})[0] for _ in range(rounds)]
            res["single_adapter"] = {"bare_s": statistics.median(bare), "resident_first_use_s": t_first,
                                     "resident_s": statistics.median(again), "adapter_path_s": statistics.median(disk)}

            say("exam: 10 prompts × 2 variants, against 20 single calls")
            variants = [{"adapters": []}, {"adapters": [{"id": ids[0]}]}]
            singles, single_answers, t_singles = [], {}, 0.0
            for i, q in enumerate(QUESTIONS):
                for j, v in enumerate(variants):
                    t, r = _timed(client, {**ask, "messages": [{"role": "user", "content": q}], **v})
                    t_singles += t
                    singles.append(t)
                    single_answers[(i, j)] = r["tokenIds"]
            t_exam, exam = _timed(client, {**ask, "prompts": [{"messages": [{"role": "user", "content": q}]}
                                                              for q in QUESTIONS], "variants": variants})
            same = sum(a["tokenIds"] == single_answers[(a["prompt"], a["variant"])] for a in exam["answers"])
            tokens = sum(a["tokens"] for a in exam["answers"])
            res["exam"] = {"single_calls_s": t_singles, "exam_s": t_exam, "speedup": t_singles / t_exam,
                           "answers": len(exam["answers"]), "identical_answers": same, "generated_tokens": tokens,
                           "single_call_median_s": statistics.median(singles)}
            say(f"  20 single calls {t_singles:.2f} s, exam {t_exam:.2f} s: ×{t_singles / t_exam:.2f}, "
                f"{same}/20 answers identical")

            say("stacked adapters: bare, 1, 2, 4 (interleaved rounds)")
            story = [{"role": "user", "content": STORY}]
            stacks = {k: [{"id": rid, "scale": 1 / k} for rid in ids[:k]] for k in (1, 2, 4)}
            stacks[0] = []
            per_token: dict[int, list[float]] = {k: [] for k in stacks}
            per_call: dict[int, list[float]] = {k: [] for k in stacks}
            tokens_of: dict[int, int] = {}
            for _ in range(rounds):
                for k in (0, 1, 2, 4):
                    t, r = _timed(client, {**ask, "messages": story, "adapters": stacks[k]})
                    per_call[k].append(t)
                    tokens_of[k] = r["tokens"]
                    per_token[k].append(t / max(r["tokens"], 1))
            rows = []
            for k in (0, 1, 2, 4):
                ms = statistics.median(per_token[k]) * 1000
                rows.append({"adapters": k, "ms_per_token": ms, "call_s": statistics.median(per_call[k]),
                             "tokens": tokens_of[k],
                             "vs_bare": ms / (statistics.median(per_token[0]) * 1000)})
            res["stacks"] = rows
        finally:
            client.close(timeout=120)
    res["load_average_end"] = os.getloadavg()[0]
    res["target"] = {"target": TARGET, "value": res["exam"]["speedup"], "pass": res["exam"]["speedup"] >= 3}
    res["sidecar_log_tail"] = tail(log_path, 5)
    write_json(out, res)
    print_report(res)
    return res


def print_report(res: dict[str, Any], out=sys.stdout) -> None:
    w = out.write
    w("\n== lora-sidecar genome benchmark (embedded SmolLM2-135M, 4 resident rank-16 adapters) ==\n")
    w(f"threads {res['threads']}, load average {res['load_average_start']:.2f} at start, "
      f"{res['load_average_end']:.2f} at end; greedy, maxNewTokens {res['max_new_tokens']}\n\n")
    e = res["exam"]
    w(f"exam 10 prompts × 2 variants: {e['exam_s']:.2f} s;  20 single calls: {e['single_calls_s']:.2f} s "
      f"(median {e['single_call_median_s']:.2f} s each);  speed-up ×{e['speedup']:.2f};  "
      f"{e['identical_answers']}/{e['answers']} answers identical token for token\n")
    s = res["single_adapter"]
    w(f"one question, one adapter: bare {s['bare_s']:.3f} s, resident {s['resident_s']:.3f} s "
      f"(first use, injecting it: {s['resident_first_use_s']:.3f} s), adapterPath from disk {s['adapter_path_s']:.3f} s\n\n")
    w(f"{'stacked adapters':>18}{'tokens':>8}{'ms / token':>12}{'per call (s)':>14}{'vs bare':>10}\n")
    for row in res["stacks"]:
        w(f"{row['adapters']:>18}{row['tokens']:>8}{row['ms_per_token']:>12.1f}{row['call_s']:>14.3f}"
          f"{row['vs_bare']:>10.2f}\n")
    t = res["target"]
    w(f"\n[{'PASS' if t['pass'] else 'FAIL'}] {t['target']}: ×{t['value']:.2f}\n")
    w(f"JSON: {res['out']}\n")
