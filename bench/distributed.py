"""Distributed jobs on this machine: 2 processes × 1 thread against 1 process × 2 threads, and the
warm worker group's second job against its first.

    bootstrap/train-wrapper.sh -m bench.distributed [--steps 8] [--model default]
    bootstrap/train-wrapper.sh -m bench --distributed      # the same, as a section of the main bench

One sidecar process runs three jobs of the benchmark's job (same data, seed and global batch 4;
dropout 0 so the two ways of running it must give the same adapter):

1. ``single``: in the sidecar, batchSize 4, 2 compute threads;
2. ``group-1``: ``distributed: {processes: 2}``, batchSize 2 per process, 1 thread per process —
   starts the worker group (process start, imports, rendezvous, model load in each rank);
3. ``group-2``: the same again, on the warm group;
4. ``single-2``: the first job again (the load of a shared machine drifts; both are reported);
5. ``single-1t``: the same job in a second sidecar with 1 compute thread, to read the table by.

Throughput is each job's ``metrics.tokensPerSecond`` (tokens fed / training seconds, loading
excluded). Start is request sent → first ``training`` progress notification with step ≥ 1 (the
first step done, as the client sees it), next to the server's ``timeToFirstStepMs``, and request →
the ``training`` phase begins (step 0: the start without the first step's compute).
"""

from __future__ import annotations

import argparse
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
    settings = settings.with_(dropout=0.0, batch_size=4)
    workdir.mkdir(parents=True, exist_ok=True)
    env = thread_env(THREADS)
    env["LORA_SIDECAR_WORKER_THREADS"] = "1"
    group = {"batchSize": 2, "distributed": {"processes": 2}}
    jobs = _jobs_in_one_sidecar(settings, workdir, "sidecar", env, [
        ("single", {}), ("group-1", group), ("group-2", group), ("single-2", {})], timeout, wrapper)
    # For reading the table: the same job in one process with one thread (a second sidecar).
    jobs.update(_jobs_in_one_sidecar(settings, workdir, "sidecar-1-thread", thread_env(1), [("single-1t", {})],
                                     timeout, wrapper))
    log_text = (workdir / "sidecar.log").read_text(errors="replace")
    group_ready = [float(line.split("worker group ready in ", 1)[1].split(" s")[0])
                   for line in log_text.splitlines() if "worker group ready in " in line]
    return {
        "settings": settings.to_dict(),
        "threads": {"single": THREADS, "per_worker": 1, "workers": 2, "single-1t": 1},
        "jobs": jobs,
        "group_start_s": group_ready[0] if group_ready else None,
        "adapter_max_abs_difference": _max_difference(jobs["single"]["adapter_dir"], jobs["group-2"]["adapter_dir"]),
        # against the better of the two single-process runs
        "throughput_ratio": jobs["group-2"]["tokens_per_s"] / max(jobs["single"]["tokens_per_s"],
                                                                   jobs["single-2"]["tokens_per_s"]),
        "warm_start_ratio": jobs["group-1"]["request_to_first_step_s"] / jobs["group-2"]["request_to_first_step_s"],
        "warm_training_start_ratio": (jobs["group-1"]["request_to_training_start_s"]
                                      / jobs["group-2"]["request_to_training_start_s"]),
    }


def _jobs_in_one_sidecar(settings: JobSettings, workdir: Path, name: str, env: dict[str, str],
                         jobs: list[tuple[str, dict[str, Any]]], timeout: float, wrapper: Path) -> dict[str, Any]:
    """Run ``jobs`` one after the other in one new sidecar process; the figures of each."""
    from sidecar.client import RemoteError, SidecarClient

    log_path = workdir / f"{name}.log"
    events: list[tuple[float, str, Any]] = []
    lock = threading.Lock()

    def on_notification(method: str, params: Any) -> None:
        with lock:
            events.append((now(), method, params))

    out: dict[str, Any] = {}
    with open(log_path, "wb") as log:
        client = SidecarClient([str(wrapper), "-m", "sidecar"], env=env, stderr=log, on_notification=on_notification)
        try:
            client.call("supports", {"baseModel": settings.model}, timeout=600)
            for job, extra in jobs:
                params = settings.train_params(str(workdir / f"adapter-{job}"), jobId=f"bench-{job}",
                                               progressInterval=0, **extra)
                t_send = now()
                try:
                    result = client.call("train", params, timeout=timeout)
                except (RemoteError, RuntimeError, TimeoutError) as exc:
                    raise RuntimeError(f"job {job} failed: {exc}; log {log_path}:\n{tail(log_path)}") from exc
                with lock:
                    training = [(t, p["step"]) for t, m, p in events if m == "progress"
                                and p["jobId"] == f"bench-{job}" and p["phase"] == "training"]
                m = result["metrics"]
                out[job] = {"tokens_per_s": m["tokensPerSecond"],
                            "request_to_training_start_s": training[0][0] - t_send,
                            "request_to_first_step_s": next(t for t, step in training if step >= 1) - t_send,
                            "server_time_to_first_step_s": m["timeToFirstStepMs"] / 1000,
                            "load_time_s": m["loadTimeMs"] / 1000, "model_cached": m["modelCached"],
                            "train_loss": m["trainLoss"], "steps": m["steps"], "adapter_dir": result["adapterPath"]}
        finally:
            if client.close(timeout=60) != 0:
                raise RuntimeError(f"{name} did not exit cleanly; log {log_path}:\n{tail(log_path)}")
    return out


def _max_difference(a: str, b: str) -> float:
    from safetensors.torch import load_file

    x, y = load_file(f"{a}/adapter_model.safetensors"), load_file(f"{b}/adapter_model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def print_table(res: dict[str, Any], out=sys.stdout) -> None:
    j = res["jobs"]
    w = out.write
    w("\ndistributed (one sidecar; same job, global batch 4, dropout 0):\n")
    w(f"  {'':38}{'tokens/s':>10}{'→ training (s)':>16}{'→ 1st step done (s)':>21}{'server (s)':>12}"
      f"{'model load (s)':>16}\n")
    for name, label in (("single", "1 process × 2 threads"), ("group-1", "2 processes × 1 thread, new group"),
                        ("group-2", "2 processes × 1 thread, warm group"), ("single-2", "1 process × 2 threads, again"),
                        ("single-1t", "1 process × 1 thread (own sidecar)")):
        if name not in j:
            continue
        r = j[name]
        start = r.get("request_to_training_start_s")
        w(f"  {label:38}{r['tokens_per_s']:>10.1f}{'n/a' if start is None else f'{start:.2f}':>16}"
          f"{r['request_to_first_step_s']:>21.2f}"
          f"{r['server_time_to_first_step_s']:>12.2f}{r['load_time_s']:>16.2f}\n")
    w(f"  2 × 1 (warm) against the better 1 × 2 run: ×{res['throughput_ratio']:.2f}; warm group: first step done "
      f"×{res['warm_start_ratio']:.1f} sooner")
    if "warm_training_start_ratio" in res:
        w(f", training begins ×{res['warm_training_start_ratio']:.0f} sooner")
    w(f" (group start {res['group_start_s']} s); adapters differ by at most {res['adapter_max_abs_difference']:.2e}\n")


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
    write_json(out, res)
    print_table(res)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
