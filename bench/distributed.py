"""Distributed jobs on this machine: 2 processes × 1 thread against 1 process × 2 threads, and the
warm worker group's second job against its first.

    bootstrap/train-wrapper.sh -m bench.distributed [--steps 8] [--model default]
    bootstrap/train-wrapper.sh -m bench --distributed      # the same, as a section of the main bench

One sidecar process runs three jobs of the benchmark's job (same data, seed and global batch 4;
dropout 0 so the two ways of running it must give the same adapter):

1. ``single``: in the sidecar, batchSize 4, 2 compute threads;
2. ``group-1``: ``distributed: {processes: 2}``, batchSize 2 per process, 1 thread per process —
   starts the worker group (process start, imports, rendezvous, model load in each rank);
3. ``group-2``: the same again, on the warm group.

Throughput is each job's ``metrics.tokensPerSecond`` (tokens fed / training seconds, loading
excluded). Start is request sent → first ``training`` progress notification with step ≥ 1 (the
first step done, as the client sees it), next to the server's ``timeToFirstStepMs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, REPO, JobSettings, now, tail, thread_env, write_json

THREADS = 2


def run(settings: JobSettings, workdir: Path, *, timeout: float = 7200,
        wrapper: Path = REPO / "bootstrap" / "train-wrapper.sh") -> dict[str, Any]:
    from sidecar.client import RemoteError, SidecarClient

    settings = settings.with_(dropout=0.0, batch_size=4)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "sidecar.log"
    events: list[tuple[float, str, Any]] = []
    lock = threading.Lock()

    def on_notification(method: str, params: Any) -> None:
        with lock:
            events.append((now(), method, params))

    env = thread_env(THREADS)
    env["LORA_SIDECAR_WORKER_THREADS"] = "1"
    jobs: dict[str, dict[str, Any]] = {}
    with open(log_path, "wb") as log:
        client = SidecarClient([str(wrapper), "-m", "sidecar"], env=env, stderr=log, on_notification=on_notification)
        try:
            client.call("supports", {"baseModel": settings.model}, timeout=600)
            for name, extra in (("single", {}),
                                ("group-1", {"batchSize": 2, "distributed": {"processes": 2}}),
                                ("group-2", {"batchSize": 2, "distributed": {"processes": 2}})):
                params = settings.train_params(str(workdir / f"adapter-{name}"), jobId=f"bench-{name}",
                                               progressInterval=0, **extra)
                t_send = now()
                try:
                    result = client.call("train", params, timeout=timeout)
                except (RemoteError, RuntimeError, TimeoutError) as exc:
                    raise RuntimeError(f"job {name} failed: {exc}; log {log_path}:\n{tail(log_path)}") from exc
                with lock:
                    steps = [t for t, m, p in events if m == "progress" and p["jobId"] == f"bench-{name}"
                             and p["phase"] == "training" and p["step"] >= 1]
                m = result["metrics"]
                jobs[name] = {"tokens_per_s": m["tokensPerSecond"], "request_to_first_step_s": steps[0] - t_send,
                              "server_time_to_first_step_s": m["timeToFirstStepMs"] / 1000,
                              "load_time_s": m["loadTimeMs"] / 1000, "model_cached": m["modelCached"],
                              "train_loss": m["trainLoss"], "steps": m["steps"], "adapter_dir": result["adapterPath"]}
        finally:
            code = client.close(timeout=60)
    log_text = log_path.read_text(errors="replace")
    group_ready = [float(line.split("worker group ready in ", 1)[1].split(" s")[0])
                   for line in log_text.splitlines() if "worker group ready in " in line]
    return {
        "settings": settings.to_dict(),
        "threads": {"single": THREADS, "per_worker": 1, "workers": 2},
        "jobs": jobs,
        "group_start_s": group_ready[0] if group_ready else None,
        "adapter_max_abs_difference": _max_difference(jobs["single"]["adapter_dir"], jobs["group-2"]["adapter_dir"]),
        "throughput_ratio": jobs["group-2"]["tokens_per_s"] / jobs["single"]["tokens_per_s"],
        "warm_start_ratio": jobs["group-1"]["request_to_first_step_s"] / jobs["group-2"]["request_to_first_step_s"],
        "exit_code": code,
        "log": str(log_path),
    }


def _max_difference(a: str, b: str) -> float:
    from safetensors.torch import load_file

    x, y = load_file(f"{a}/adapter_model.safetensors"), load_file(f"{b}/adapter_model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def print_table(res: dict[str, Any], out=sys.stdout) -> None:
    j = res["jobs"]
    w = out.write
    w("\ndistributed (one sidecar; same job, global batch 4, dropout 0):\n")
    w(f"  {'':38}{'tokens/s':>10}{'request → 1st step (s)':>24}{'server (s)':>12}{'model load (s)':>16}\n")
    for name, label in (("single", "1 process × 2 threads"), ("group-1", "2 processes × 1 thread, new group"),
                        ("group-2", "2 processes × 1 thread, warm group")):
        r = j[name]
        w(f"  {label:38}{r['tokens_per_s']:>10.1f}{r['request_to_first_step_s']:>24.2f}"
          f"{r['server_time_to_first_step_s']:>12.2f}{r['load_time_s']:>16.2f}\n")
    w(f"  2 × 1 against 1 × 2 throughput: ×{res['throughput_ratio']:.2f}; warm group start ×"
      f"{res['warm_start_ratio']:.1f} faster (group start {res['group_start_s']} s); adapters differ by at most "
      f"{res['adapter_max_abs_difference']:.2e}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per job (default 8)")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/distributed-<UTC time>.json)")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH_DIR / "results" / f"distributed-{stamp}.json"
    with tempfile.TemporaryDirectory(prefix="lora-bench-dist-") as tmp:
        load_start = os.getloadavg()[0]
        t0 = time.monotonic()
        res = run(JobSettings(model=args.model, max_steps=args.steps), Path(tmp), timeout=args.timeout)
        res.update({"format": "lora-sidecar.bench-distributed/1", "started_at": stamp,
                    "command": " ".join(["python -m bench.distributed"] + (argv if argv is not None else sys.argv[1:])),
                    "cpus": os.cpu_count(), "load_average": {"start": load_start, "end": os.getloadavg()[0]},
                    "seconds": round(time.monotonic() - t0, 1)})
        for job in res["jobs"].values():
            job.pop("adapter_dir")
        res.pop("log")
    write_json(out, res)
    print_table(res)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
