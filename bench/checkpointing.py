"""What checkpointing costs: the benchmark's job (embedded model, bench dataset) with checkpoints off,
with the default rule, and with a checkpoint every few steps.

    bootstrap/train-wrapper.sh -m bench.checkpointing [--steps N] [--threads T] [--out FILE]

Runs in this process, like the lever table (bench/levers.py): a short warm-up job loads the model,
then each row is one engine job. Rows:

- ``off``: ``checkpointEvery: 0, checkpointSeconds: 0`` (no checkpoint, no per-step state capture)
- ``default``: neither field — the default rule (every 600 s of training), which writes none in a
  job this short: what a short job pays for the rule (the per-step capture of the generator states
  that a cancel checkpoint needs)
- ``every_4`` / ``every_1``: a checkpoint every 4 steps / every step, to measure one checkpoint
- ``off_repeat``: ``off`` again (machine noise)

tokens/s is the engine's (checkpoint writing counts as training time). The per-checkpoint cost is
the time spent writing checkpoints divided by their number (from the manifest); the default rule's
overhead on a long job is that cost divided by 600 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, JobSettings, write_json
from .inproc import env_var, torch_threads

ROWS = [
    ("off", {"checkpointEvery": 0, "checkpointSeconds": 0}),
    ("default", {}),
    ("every_4", {"checkpointEvery": 4, "keepCheckpoints": 2}),
    ("every_1", {"checkpointEvery": 1, "keepCheckpoints": 2}),
    ("off_repeat", {"checkpointEvery": 0, "checkpointSeconds": 0}),
]


def _job(params: dict[str, Any], models: Any, workdir: Path, name: str) -> dict[str, Any]:
    from sidecar import wire
    from sidecar.training import checkpoint, train

    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    sizes: list[int] = []
    p = wire.decode_params({**params, "outputPath": str(out), "jobId": name}, wire.TrainParams)
    t0 = time.monotonic()
    result = train(p, job_id=name, models=models, should_stop=lambda: False, received_at=time.time(),
                   report=lambda pr: pr.checkpoint and sizes.append(pr.checkpoint.bytes))
    wall = time.monotonic() - t0
    manifest = json.loads(Path(result.manifest_path).read_text())
    ck = manifest["checkpointing"]
    shutil.rmtree(out, ignore_errors=True)
    m = result.metrics
    return {
        "tokens_per_s": m.tokens_per_second, "steps": m.steps, "training_s": m.training_time / 1000,
        "job_wall_s": round(wall, 3), "checkpoints": ck["written"], "checkpoint_s": ck["secondsSpent"],
        "per_checkpoint_s": ck["secondsSpent"] / ck["written"] if ck["written"] else None,
        "checkpoint_bytes": max(sizes) if sizes else None, "rule": {k: ck[k] for k in ("every", "seconds", "keep")},
        "default_seconds": checkpoint.default_seconds(), "final_loss": m.final_loss,
    }


def run(settings: JobSettings, workdir: Path) -> dict[str, Any]:
    import torch

    from sidecar.models import ModelCache

    models = ModelCache(max_models=1)
    base = settings.train_params("unused")
    base.pop("outputPath")
    rows = []
    with env_var("LORA_SIDECAR_DATA", str(workdir / "data")), env_var("LORA_SIDECAR_THREADS", str(settings.threads)), \
            torch_threads(settings.threads):
        _job({**base, "maxSteps": 2}, models, workdir, "warmup")
        threads_used = torch.get_num_threads()
        for name, change in ROWS:
            print(f"checkpointing row {name} ...", file=sys.stderr, flush=True)
            r = _job({**base, **change}, models, workdir, f"ckpt-{name}")
            rows.append({"name": name, "change": change, **r})
            print(f"  {name}: {r['tokens_per_s']:.1f} tokens/s, {r['checkpoints']} checkpoints"
                  + (f", {r['per_checkpoint_s'] * 1000:.0f} ms / {r['checkpoint_bytes'] / 2**20:.1f} MiB each"
                     if r["checkpoints"] else ""), file=sys.stderr, flush=True)
    by = {r["name"]: r for r in rows}
    ref = (by["off"]["tokens_per_s"] + by["off_repeat"]["tokens_per_s"]) / 2
    per = [r["per_checkpoint_s"] for r in rows if r["per_checkpoint_s"]]
    per_checkpoint = sum(per) / len(per) if per else None
    for r in rows:
        r["relative_tokens_per_s"] = r["tokens_per_s"] / ref
    return {
        "format": "lora-sidecar.bench-checkpointing/1",
        "settings": settings.to_dict(),
        "torch_threads": threads_used,
        "reference_tokens_per_s": ref,
        "noise": abs(by["off"]["tokens_per_s"] - by["off_repeat"]["tokens_per_s"]) / ref,
        "per_checkpoint_s": per_checkpoint,
        "checkpoint_bytes": by["every_1"]["checkpoint_bytes"],
        "default_rule_overhead_long_job": per_checkpoint / by["default"]["default_seconds"] if per_checkpoint else None,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.checkpointing", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, help="optimizer steps per job (default: one full epoch, 16 steps)")
    p.add_argument("--threads", type=int, help="compute threads (default: torch's default)")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/checkpointing-<UTC time>.json)")
    args = p.parse_args(argv)
    import torch

    settings = JobSettings(model=args.model, max_steps=args.steps, threads=args.threads or torch.get_num_threads())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH_DIR / "results" / f"checkpointing-{stamp}.json"
    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-ckpt-"))
    try:
        res = run(settings, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["started_at"] = stamp
    res["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_json(out, res)
    print(f"{'row':<11} {'tokens/s':>9} {'vs off':>7} {'ckpts':>6} {'ms/ckpt':>8} {'MiB/ckpt':>9}")
    for r in res["rows"]:
        ms = f"{r['per_checkpoint_s'] * 1000:.0f}" if r["per_checkpoint_s"] else "-"
        mib = f"{r['checkpoint_bytes'] / 2**20:.1f}" if r["checkpoint_bytes"] else "-"
        print(f"{r['name']:<11} {r['tokens_per_s']:>9.1f} {r['relative_tokens_per_s']:>7.3f} {r['checkpoints']:>6} "
              f"{ms:>8} {mib:>9}")
    if res["default_rule_overhead_long_job"] is not None:
        print(f"default rule (a checkpoint per {settings_default()} s) on a long job: "
              f"{res['default_rule_overhead_long_job'] * 100:.3f} % of training time; noise {res['noise'] * 100:.1f} %")
    print(f"written to {out}")
    return 0


def settings_default() -> float:
    from sidecar.training.checkpoint import default_seconds

    return default_seconds()


if __name__ == "__main__":
    raise SystemExit(main())
