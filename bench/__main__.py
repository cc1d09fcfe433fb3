"""Side-by-side benchmark: the old per-process TRL pipeline against a warm sidecar.

    bootstrap/train-wrapper.sh -m bench                    # baseline + sidecar + limit, full epoch
    bootstrap/train-wrapper.sh -m bench --levers --scaling # plus the lever and scaling tables
    bootstrap/train-wrapper.sh -m bench --quick            # smoke test: 3 steps per job
    bootstrap/train-wrapper.sh -m bench --genome           # only the adapter-genome benchmark (bench/genome.py)
    bootstrap/train-wrapper.sh -m bench --coexist          # only llama.cpp beside training jobs (bench/coexist.py)

Prints a table and writes a JSON file (default ``bench/results/<UTC time>.json``) with the raw
figures, the ratios and each target's pass/fail. See docs/PERFORMANCE.md for the method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import baseline, limit, sidecar_side
from .common import BENCH_DIR, TOKEN_DEFINITION, JobSettings, tail, thread_env, write_json
from .dataset import SHAPES

LOSS_TOLERANCE = 0.05
"""Nats: the sidecar's adapter may score at most this much worse than the baseline's."""

TARGETS = {
    "speedup": "sidecar tokens/s ≥ 3 × baseline tokens/s (every data shape)",
    "limit_fraction": "sidecar tokens/s ≥ 0.60 × the matmul bound in the precision it computes in (chat); "
                      "fp32 peak, or bf16 blocks + fp32 head where it takes bf16 matmuls",
    # "First step" is the first `training` progress notification, sent as the first optimizer step
    # begins: what a caller waits for before its job trains. The first step's own compute (the same
    # batch on both sides, over a second on this CPU for a long batch) is reported beside it.
    "first_step_abs": "second job: request → first step begins (first training progress) ≤ 0.5 s",
    "first_step_ratio": "baseline launch → first step begins ≥ 10 × sidecar request → first step begins",
    "first_step_done_abs": "(info) second job: request → first step completed, its compute included ≤ 0.5 s",
    "peak_rss": "sidecar peak RSS ≤ baseline peak RSS",
    "loss": f"sidecar adapter loss ≤ baseline adapter loss + {LOSS_TOLERANCE} (same tokens, same scorer; every shape)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help="model name as the sidecar resolves it (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/<UTC time>.json)")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the TRL baseline")
    p.add_argument("--steps", type=int, help="optimizer steps per job (default: one full epoch)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 steps per job, shorter matmul probe, 1-step scaling runs")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"data shapes to run, comma-separated (default: all of {', '.join(SHAPES)}; "
                        "see bench/dataset.py)")
    p.add_argument("--levers", action="store_true", help="also measure each engine lever")
    p.add_argument("--scaling", action="store_true", help="also measure tokens/s and memory vs length and rank")
    p.add_argument("--distributed", action="store_true",
                   help="also compare 2 worker processes × 1 thread with 1 process × 2 threads, and a warm "
                        "worker group's second job with its first (bench/distributed.py)")
    p.add_argument("--threads", type=int, help="compute threads on every side (default: torch's default)")
    p.add_argument("--workdir", type=Path, help="where adapters and logs go (default: a temp dir, removed "
                   "after a successful run)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds allowed per job")
    p.add_argument("--genome", action="store_true",
                   help="run only the genome benchmark: exam batches vs single calls, stacked adapters")
    p.add_argument("--coexist", action="store_true",
                   help="run only the coexistence benchmark: llama.cpp decoding beside normal, background, paused "
                        "and yielding jobs (bench/coexist.py; JSON to docs/bench-runs/)")
    p.add_argument("--phase-seconds", type=float, default=20, help="--coexist: seconds per phase")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="print the table of an earlier run's JSON again (ratios recomputed), run nothing")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Machine and dataset facts
# ---------------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version()}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def dataset_stats(model_path: str, dataset_path: str, max_seq_length: int) -> dict[str, Any]:
    """Token counts with the sidecar's own rendering and labels (what both sides feed)."""
    from transformers import AutoTokenizer

    from sidecar import data

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    records = data.load_jsonl(dataset_path)
    items, stats = data.tokenize(records, tokenizer, loss_on="assistant", max_seq_length=max_seq_length)
    lengths = [len(t.input_ids) for t in items]
    ordered = sorted(lengths)
    msgs = [r.example.messages or [] for r in records]
    return {
        "path": dataset_path,
        "examples": stats.examples,
        "tokens": stats.tokens,
        "label_tokens": stats.trainable_tokens,
        "truncated": stats.truncated,
        "sha256": stats.sha256,
        "min_length": ordered[0],
        "median_length": ordered[len(ordered) // 2],
        "max_length": ordered[-1],
        "with_system_prompt": sum(1 for m in msgs if m and m[0].role == "system"),
        "multi_turn": sum(1 for m in msgs if sum(x.role == "assistant" for x in m) > 1),
        "tokenizer": "the model's own (SmolLM2 BPE, ChatML template; examples without a system turn get the "
                     "template's default system prompt)",
        "lengths": lengths,
    }


# ---------------------------------------------------------------------------------------------
# Ratios and targets
# ---------------------------------------------------------------------------------------------

def compute_ratios(res: dict[str, Any]) -> dict[str, Any]:
    b, s, lim, ev = res.get("baseline"), res.get("sidecar"), res.get("limit"), res.get("evaluation")
    shape = limit.ModelShape(**{k: res["model"]["shape"][k] for k in
                                ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")})
    r: dict[str, Any] = {}
    if s:
        m = s["measured_job"]
        frac = m["label_tokens"] / m["tokens"]
        fpt = limit.flops_per_token(shape, logit_fraction=frac)
        achieved = s["tokens_per_s"] * fpt
        r["sidecar_flops_per_token"] = fpt
        r["sidecar_logit_positions_fraction"] = frac
        r["sidecar_model_gflops"] = achieved / 1e9
        if lim:
            peak = lim["peak_gflops"] * 1e9
            r["limit_fraction"] = achieved / peak
            r["limit_tokens_per_s"] = peak / fpt
            lengths = res["dataset"]["lengths"]
            extra = limit.extra_flops(shape, rank=res["settings"]["rank"],
                                      target_modules=res["settings"]["target_modules"], tokens=m["tokens"],
                                      sequence_lengths=lengths) if lengths and not res["settings"]["max_steps"] else None
            if extra:
                total = fpt * m["tokens"] + extra["lora"] + extra["attention"]
                r["sidecar_full_gflops_incl_lora_attention"] = total / m["tokens"] * s["tokens_per_s"] / 1e9
                r["limit_fraction_incl_lora_attention"] = r["sidecar_full_gflops_incl_lora_attention"] * 1e9 / peak
        # The precision the sidecar's matmuls ran in (training/bf16.py): its own hardware bound.
        r["sidecar_bf16_matmuls"] = bool((m.get("engine") or {}).get("bf16MatmulLayers"))
        lim16 = res.get("limit_bf16")
        if lim and r["sidecar_bf16_matmuls"] and lim16:
            bound = limit.mixed_bound(shape, logit_fraction=frac, block_gflops=lim16["peak_gflops"],
                                      head_gflops=lim["peak_gflops"])
            r["compute_limit_tokens_per_s"] = bound
            r["compute_limit"] = "bf16 blocks (measured bf16 peak) + fp32 LM head"
        elif lim:
            r["compute_limit_tokens_per_s"] = r["limit_tokens_per_s"]
            r["compute_limit"] = "fp32 (measured fp32 peak)"
        if "compute_limit_tokens_per_s" in r:
            r["compute_limit_fraction"] = s["tokens_per_s"] / r["compute_limit_tokens_per_s"]
        r["sidecar_request_to_first_step_s"] = s["request_to_first_step_s"]
        r["sidecar_request_to_training_start_s"] = m["request_to_training_start_s"]
    if b:
        fpt_b = limit.flops_per_token(shape, logit_fraction=1.0)
        r["baseline_model_gflops"] = b["tokens_per_s"] * fpt_b / 1e9
        if lim:
            r["baseline_limit_fraction"] = r["baseline_model_gflops"] / lim["peak_gflops"]
        r["baseline_padding_fraction"] = 1 - b["tokens"] / b["padded_tokens"]
    if b and s:
        r["speedup"] = s["tokens_per_s"] / b["tokens_per_s"]
        r["first_step_ratio"] = b["launch_to_first_step_s"] / s["request_to_first_step_s"]
        r["training_start_ratio"] = b["launch_to_first_step_begin_s"] / s["measured_job"]["request_to_training_start_s"]
        r["peak_rss_ratio"] = s["peak_rss_mb"] / b["peak_rss_mb"]
        r["equal_tokens"] = s["tokens"] == b["tokens"]
    if ev and "baseline" in ev["losses"] and "sidecar" in ev["losses"]:
        r["loss_difference"] = ev["losses"]["sidecar"] - ev["losses"]["baseline"]
    return r


def check_targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    r = res["ratios"]
    s = res.get("sidecar")

    def t(key: str, value: Any, ok: bool | None) -> dict[str, Any]:
        return {"target": TARGETS[key], "value": value, "pass": ok}

    out = {
        "speedup": t("speedup", r.get("speedup"), None if "speedup" not in r else r["speedup"] >= 3),
        "limit_fraction": t("limit_fraction", r.get("compute_limit_fraction"),
                            None if "compute_limit_fraction" not in r else r["compute_limit_fraction"] >= 0.60),
        "first_step_abs": t("first_step_abs", s and s["measured_job"]["request_to_training_start_s"],
                            None if not s else s["measured_job"]["request_to_training_start_s"] <= 0.5),
        "first_step_ratio": t("first_step_ratio", r.get("training_start_ratio"),
                              None if "training_start_ratio" not in r else r["training_start_ratio"] >= 10),
        "first_step_done_abs": t("first_step_done_abs", s and s["request_to_first_step_s"],
                                 None if not s else s["request_to_first_step_s"] <= 0.5),
        "peak_rss": t("peak_rss", r.get("peak_rss_ratio"),
                      None if "peak_rss_ratio" not in r else r["peak_rss_ratio"] <= 1.0),
        "loss": t("loss", r.get("loss_difference"),
                  None if "loss_difference" not in r else r["loss_difference"] <= LOSS_TOLERANCE),
    }
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def _f(x: Any, fmt: str = "{:.1f}") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return fmt.format(x)


def report_all(res: dict[str, Any], out=sys.stdout) -> None:
    first = True
    for name, sh in res["shapes"].items():
        if "ratios" in sh:
            out.write(f"\n######## data shape: {name} ########")
            view = shape_view(res, name)
            if not first:  # the lever and scaling tables belong to the run, not to a shape: print them once
                view = {k: v for k, v in view.items() if k not in ("levers", "scaling")}
            print_report(view, out)
            first = False
    print_summary(res, out)


def print_report(res: dict[str, Any], out=sys.stdout) -> None:
    b, s, r, ev = res.get("baseline"), res.get("sidecar"), res["ratios"], res.get("evaluation")
    bm, sm = (b or {}), (s or {})
    w = out.write
    w("\n== lora-sidecar benchmark ==\n")
    mi = res["machine"]
    w(f"machine: {mi['cpu']}, {mi['logical_cpus']} logical CPUs, {mi['threads']} threads used; "
      f"load average at start {_f(res['load_average']['start'], '{:.2f}')}\n")
    d = res["dataset"]
    w(f"model: {res['model']['name']} ({res['model']['kind']}, N = {res['model']['shape']['linear_params_N']:,} "
      f"linear params)\n")
    w(f"dataset: {d['examples']} examples, {d['tokens']} tokens ({d['label_tokens']} labelled), lengths "
      f"{d['min_length']}–{d['max_length']} (median {d['median_length']}), {d['with_system_prompt']} with a system "
      f"prompt, {d['multi_turn']} multi-turn\n")
    steps = res["settings"]["max_steps"]
    w(f"job: LoRA r{res['settings']['rank']} α{res['settings']['alpha']:g} on {len(res['settings']['target_modules'])} "
      f"projections, batch {res['settings']['batch_size']}, lr {res['settings']['learning_rate']:g}, "
      f"{'1 epoch' if steps is None else f'{steps} steps (NOT a full epoch)'}\n")
    w(f"tokens: {TOKEN_DEFINITION}\n\n")

    rows = [
        ("tokens fed", _f(bm.get("tokens"), "{:d}"), _f(sm.get("tokens"), "{:d}")),
        ("training tokens/s", _f(bm.get("tokens_per_s")), _f(sm.get("tokens_per_s"))),
        ("start → first step begins (s)", _f(bm.get("launch_to_first_step_begin_s"), "{:.2f}"),
         _f(s and s["measured_job"]["request_to_training_start_s"], "{:.3f}")),
        ("start → first step done (s)", _f(bm.get("launch_to_first_step_s"), "{:.2f}"),
         _f(sm.get("request_to_first_step_s"), "{:.3f}")),
        ("  server timeToFirstStepMs (s)", "", _f(sm.get("server_time_to_first_step_s"), "{:.3f}")),
        ("peak RSS (MiB)", _f(bm.get("peak_rss_mb"), "{:.0f}"), _f(sm.get("peak_rss_mb"), "{:.0f}")),
        ("final step loss (logged)", _f(bm.get("final_loss"), "{:.4f}"), _f(sm.get("final_loss"), "{:.4f}")),
        ("mean training loss (logged)", _f(bm.get("train_loss"), "{:.4f}"), _f(sm.get("train_loss"), "{:.4f}")),
        ("adapter loss on the dataset", _f(ev and ev["losses"].get("baseline"), "{:.4f}"),
         _f(ev and ev["losses"].get("sidecar"), "{:.4f}")),
        ("model GFLOP/s", _f(r.get("baseline_model_gflops")), _f(r.get("sidecar_model_gflops"))),
    ]
    w(f"{'':34}{'baseline (TRL, fresh process)':>32}{'sidecar (warm, 2nd job)':>26}\n")
    for name, bv, sv in rows:
        w(f"{name:34}{bv:>32}{sv:>26}\n")
    if b:
        w(f"baseline start = process launch; phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in b["phases_s"].items())
          + "\n")
    if s:
        w(f"sidecar start = `train` request sent; cold first job: request → first step "
          f"{s['warmup_job']['request_to_first_step_s']:.2f} s (model load "
          f"{s['warmup_job']['metrics']['loadTimeMs'] / 1000:.2f} s)\n")
    if ev:
        w(f"base model (no adapter) loss on the dataset: {ev['losses']['base_model']:.4f}\n")
    lim = res.get("limit")
    if lim:
        w(f"\nlimit: fp32 matmul peak {lim['peak_gflops']:.1f} GFLOP/s on {lim['threads']} threads "
          f"(shape {lim['peak_shape']}); sidecar FLOP/token {_f(r.get('sidecar_flops_per_token'), '{:.3e}')} "
          f"→ bound {_f(r.get('limit_tokens_per_s'))} tokens/s\n")
    lim16 = res.get("limit_bf16")
    if lim16:
        w(f"       bf16 matmul peak {lim16['peak_gflops']:.1f} GFLOP/s (shape {lim16['peak_shape']}); the sidecar "
          f"computed in {r.get('compute_limit', '?')} → bound {_f(r.get('compute_limit_tokens_per_s'))} tokens/s, "
          f"fraction {_f(r.get('compute_limit_fraction'), '{:.3f}')}\n")
    w("\ntargets:\n")
    for key, t in res["targets"].items():
        status = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        w(f"  [{status}] {t['target']}: {_f(t['value'], '{:.3f}')}\n")
    lv = res.get("levers")
    if lv:
        w(f"\nlevers (engine in-process; reference {lv['reference_tokens_per_s']:.1f} tokens/s, run-to-run noise "
          f"{lv['noise'] * 100:.1f} %):\n")
        for row in lv["rows"]:
            w(f"  {row['lever']:66}{row['tokens_per_s']:>9.1f} tokens/s   lever's gain ×"
              f"{_f(row['speedup_of_lever'], '{:.2f}')}   mean training loss {_f(row.get('train_loss'), '{:.4f}')}\n")
    sc = res.get("scaling")
    if sc:
        w("\nscaling (fresh process per row):\n")
        for row in sc:
            w(f"  {row['sweep'] + ' sweep':12} length {row['length']:5}  rank {row['rank']:3}: {row['tokens_per_s']:8.1f} tokens/s, "
              f"peak RSS {row['peak_rss_mb']:6.0f} MiB\n")
    if res.get("distributed"):
        from . import distributed

        distributed.print_table(res["distributed"], out)
    w(f"\nJSON: {res['out']}\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def _child_json(module: str, config: dict[str, Any], workdir: Path, name: str, timeout: float,
                threads: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path, out_path, log_path = workdir / f"{name}-config.json", workdir / f"{name}.json", workdir / f"{name}.log"
    write_json(cfg_path, config)
    with open(log_path, "wb") as log:
        code = subprocess.call([sys.executable, "-m", module, str(cfg_path), str(out_path)], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT, env=thread_env(threads), timeout=timeout)
    if code != 0 or not out_path.is_file():
        raise RuntimeError(f"{module} failed (exit {code}); log {log_path}:\n{tail(log_path)}")
    return json.loads(out_path.read_text())


def shape_view(res: dict[str, Any], name: str) -> dict[str, Any]:
    """The run's common facts (machine, model, limit) with one data shape's results on top: the form
    ``compute_ratios``, ``check_targets`` and ``print_report`` read."""
    return {**res, **res["shapes"][name]}


def run_shape(res: dict[str, Any], name: str, model_path: str, workdir: Path, args: argparse.Namespace,
              threads: int, say, save) -> None:
    """Baseline, sidecar and scoring on one data shape; results go into ``res["shapes"][name]``."""
    sh = res["shapes"][name]
    settings = JobSettings(**{**sh["settings"], "target_modules": tuple(sh["settings"]["target_modules"])})
    sh["dataset"] = dataset_stats(model_path, settings.dataset_path, settings.max_seq_length)
    save()
    if not args.skip_baseline:
        say("baseline: fresh process, TRL SFTTrainer")
        res["load_average"][f"before_baseline_{name}"] = load_average()
        sh["baseline"] = baseline.run(settings, model_path, workdir / "baseline", timeout=args.timeout)
        b = sh["baseline"]
        say(f"  baseline: {b['tokens_per_s']:.1f} tokens/s, launch → first step {b['launch_to_first_step_s']:.2f} s")
        save()
    say("sidecar: warm process, two identical jobs over stdio")
    res["load_average"][f"before_sidecar_{name}"] = load_average()
    sh["sidecar"] = sidecar_side.run(settings, workdir / "sidecar", timeout=args.timeout)
    sd = sh["sidecar"]
    say(f"  sidecar: {sd['tokens_per_s']:.1f} tokens/s, request → first step begins "
        f"{sd['measured_job']['request_to_training_start_s']:.3f} s, completed {sd['request_to_first_step_s']:.3f} s")
    save()
    say("scoring the adapters on the dataset")
    adapters = {"sidecar": sd["adapter_dir"]}
    if sh.get("baseline"):
        adapters = {"baseline": sh["baseline"]["adapter_dir"], **adapters}
    sh["evaluation"] = _child_json("bench.evaluate", {"model_path": model_path, "dataset_path": settings.dataset_path,
                                                      "adapters": adapters, "threads": threads},
                                   workdir, "evaluation", args.timeout, threads)
    view = shape_view(res, name)
    sh["ratios"] = compute_ratios(view)
    sh["targets"] = check_targets({**view, "ratios": sh["ratios"]})
    save()


def finish_ratios(res: dict[str, Any]) -> None:
    """Ratios and targets for every shape (older single-shape JSON files are read as shape 'chat')."""
    if "shapes" not in res:
        res["shapes"] = {"chat": {k: res[k] for k in ("dataset", "baseline", "sidecar", "evaluation", "settings")
                                  if k in res}}
    for name, sh in res["shapes"].items():
        if "dataset" not in sh:
            continue
        view = shape_view(res, name)
        sh["ratios"] = compute_ratios(view)
        sh["targets"] = check_targets({**view, "ratios": sh["ratios"]})


def print_summary(res: dict[str, Any], out=sys.stdout) -> None:
    """One line per data shape: the ratio and the loss check that the targets ask of every shape."""
    w = out.write
    w("\n== per data shape ==\n")
    w(f"{'shape':8}{'examples':>9}{'tokens':>8}{'median len':>11}{'baseline tok/s':>16}{'sidecar tok/s':>15}"
      f"{'ratio':>8}{'loss Δ (sidecar−baseline)':>28}\n")
    for name, sh in res["shapes"].items():
        d, r = sh.get("dataset") or {}, sh.get("ratios") or {}
        b, s = sh.get("baseline") or {}, sh.get("sidecar") or {}
        w(f"{name:8}{d.get('examples', 0):>9}{d.get('tokens', 0):>8}{d.get('median_length', 0):>11}"
          f"{_f(b.get('tokens_per_s')):>16}{_f(s.get('tokens_per_s')):>15}{_f(r.get('speedup'), '{:.2f}×'):>8}"
          f"{_f(r.get('loss_difference'), '{:+.4f}'):>28}\n")
    w(f"\nJSON: {res['out']}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        res = json.loads(args.report.read_text())
        finish_ratios(res)
        report_all(res)
        return 0
    if args.coexist:
        from . import coexist

        coexist.run(args.phase_seconds, args.out)
        return 0
    import torch

    from sidecar.models import resolve_model

    threads = args.threads or torch.get_num_threads()
    if args.genome:
        from . import genome

        genome.run(threads=threads, quick=args.quick, out=args.out, workdir=args.workdir)
        return 0
    steps = args.steps if args.steps is not None else (3 if args.quick else None)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH_DIR / "results" / f"{stamp}.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lora-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    say(f"resolving model {args.model!r} (the embedded model is converted once, ~30 s)")
    resolved = resolve_model(args.model)
    if resolved.kind == "gguf" or resolved.kind == "hub":
        raise SystemExit(f"bench needs a model directory the TRL baseline can load; {args.model!r} resolved to "
                         f"{resolved.kind} {resolved.path}")
    settings = JobSettings(model=args.model, max_steps=steps, threads=threads)
    shape_names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in shape_names if n not in SHAPES]
    if unknown or not shape_names:
        raise SystemExit(f"unknown data shape(s) {unknown or args.shapes!r}; choose from {', '.join(SHAPES)}")
    shape = limit.ModelShape.from_config_dir(resolved.path)
    res: dict[str, Any] = {
        "format": "lora-sidecar.bench/1",
        "started_at": stamp,
        "complete": False,
        "out": str(out),
        "command": " ".join(["python -m bench"] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(threads),
        "load_average": {"start": load_average()},
        "token_definition": TOKEN_DEFINITION,
        "flop_model": limit.__doc__,
        "settings": settings.to_dict(),
        "model": {"name": args.model, "kind": resolved.kind, "path": resolved.path, "shape": limit.describe(shape)},
        "targets_definition": TARGETS,
        "workdir": str(workdir),
    }
    if (res["load_average"]["start"] or 0) > 0.5 * threads:
        say(f"WARNING: load average {res['load_average']['start']:.2f} — the machine is not quiet; timings "
            "will be low and noisy")

    try:
        say(f"matmul limit on {threads} threads")
        rows = [256] if args.quick else [256, 1024]
        res["limit"] = limit.matmul_gflops(threads, shapes=limit.representative_shapes(shape, rows),
                                           repeats=2 if args.quick else 5, min_seconds=0.05 if args.quick else 0.2)
        from sidecar.models import cpu_has_native_bf16

        if cpu_has_native_bf16():  # the sidecar's bf16 matmuls (dtype auto) have their own, higher bound
            res["limit_bf16"] = limit.matmul_gflops(threads, shapes=limit.representative_shapes(shape, rows),
                                                    repeats=2 if args.quick else 5,
                                                    min_seconds=0.05 if args.quick else 0.2, dtype="bfloat16")
        write_json(out, res)

        res["shapes"] = {}
        for name in shape_names:
            say(f"== data shape {name!r} ==")
            res["shapes"][name] = {"settings": settings.with_(dataset_path=str(SHAPES[name][0])).to_dict()}
            run_shape(res, name, resolved.path, workdir / name, args, threads, say, lambda: write_json(out, res))
        res["load_average"]["end_main"] = load_average()
        write_json(out, res)

        if args.levers:
            say("levers: engine in-process, one lever at a time (see bench/levers.py)")
            res["levers"] = _child_json("bench.levers", {"settings": settings.to_dict(), "workdir": str(workdir / "levers")},
                                        workdir, "levers", args.timeout * 4, threads)
            write_json(out, res)

        if args.scaling:
            from . import scaling

            say("scaling: fresh process per configuration")
            res["scaling"] = scaling.run_scaling(settings, resolved.path, workdir / "scaling",
                                                 steps=1 if args.quick else 2, quick=args.quick,
                                                 timeout=args.timeout)
            write_json(out, res)

        if args.distributed:
            from . import distributed

            say("distributed: one sidecar, 1 process × 2 threads, then 2 processes × 1 thread twice")
            res["distributed"] = distributed.run(settings, workdir / "distributed", timeout=args.timeout)
            write_json(out, res)

    except (Exception, KeyboardInterrupt) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        write_json(out, res)
        say(f"FAILED: {res['error']}")
        say(f"partial results: {out}; logs and adapters kept in {workdir}")
        try:  # whatever was measured before the failure is still worth a table
            finish_ratios(res)
            write_json(out, res)
            report_all(res)
        except Exception as report_exc:  # noqa: BLE001 - the failure above is the one to report
            say(f"(no table: {type(report_exc).__name__}: {report_exc})")
        return 1

    res["load_average"]["end"] = load_average()
    finish_ratios(res)
    res["complete"] = True
    write_json(out, res)
    report_all(res)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
        res["workdir"] = None
        write_json(out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
