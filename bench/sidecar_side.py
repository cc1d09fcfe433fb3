"""The sidecar side: the same job sent twice over stdio to one long-lived sidecar process.

The first job warms the process (it loads the model into the cache); the second is the measured
one. Every progress notification is timestamped on arrival, so the request → first step time is
what a client sees, next to the server's own ``metrics.timeToFirstStepMs``. Both jobs ask for
``progressInterval`` 0, so the first step's notification is not delayed by throttling.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from .common import REPO, JobSettings, now, tail, thread_env, vm_hwm_mb


def run(settings: JobSettings, workdir: Path, *, timeout: float = 7200,
        wrapper: Path = REPO / "bootstrap" / "train-wrapper.sh") -> dict[str, Any]:
    from sidecar.client import RemoteError, SidecarClient

    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "sidecar.log"
    events: list[tuple[float, str, Any]] = []
    lock = threading.Lock()

    def on_notification(method: str, params: Any) -> None:
        t = now()
        with lock:
            events.append((t, method, params))

    with open(log_path, "wb") as log:
        t_spawn = now()
        client = SidecarClient([str(wrapper), "-m", "sidecar"], env=thread_env(settings.threads), stderr=log,
                               on_notification=on_notification)
        try:
            try:
                supports = client.call("supports", {"baseModel": settings.model}, timeout=600)
                t_ready = now()
                jobs = [_job(client, settings, workdir, name, events, lock, timeout)
                        for name in ("warmup", "measured")]
            except (RemoteError, RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"sidecar side failed: {exc}; log {log_path}:\n{tail(log_path)}") from exc
            peak_rss_mb = vm_hwm_mb(client.proc.pid)
        finally:
            try:
                code = client.close(timeout=60)
            except TimeoutError:  # shutdown unanswered: the process is stuck, end it
                client.proc.kill()
                code = client.proc.wait()
    warm, measured = jobs
    return {
        "side": "sidecar",
        "spawn_to_ready_s": t_ready - t_spawn,
        "supports": {k: supports.get(k) for k in ("sidecarVersion", "protocolVersion", "libraries",
                                                   "defaultDevice", "defaultDtype")},
        "warmup_job": warm,
        "measured_job": measured,
        "tokens": measured["tokens"],
        "tokens_per_s": measured["tokens_per_s"],
        "request_to_first_step_s": measured["request_to_first_step_s"],
        "server_time_to_first_step_s": measured["metrics"]["timeToFirstStepMs"] / 1000,
        "final_loss": measured["metrics"]["finalLoss"],
        "train_loss": measured["metrics"]["trainLoss"],
        "adapter_dir": measured["adapter_dir"],
        "peak_rss_mb": peak_rss_mb,
        # Same job, same seed, same process: the engine should be deterministic across jobs.
        "jobs_identical_loss": warm["metrics"]["finalLoss"] == measured["metrics"]["finalLoss"],
        "exit_code": code,
        "log": str(log_path),
    }


def _job(client: Any, settings: JobSettings, workdir: Path, name: str, events: list, lock: threading.Lock,
         timeout: float) -> dict[str, Any]:
    job_id = f"bench-{name}"
    params = settings.train_params(str(workdir / f"adapter-{name}"), jobId=job_id, progressInterval=0)
    t_send = now()
    result = client.call("train", params, timeout=timeout)
    t_result = now()
    with lock:
        progress = [(t, p) for t, m, p in events if m == "progress" and p.get("jobId") == job_id]
    steps = [(t, p) for t, p in progress if p["phase"] == "training" and p["step"] >= 1]
    if not steps:
        raise RuntimeError(f"job {job_id}: no training progress notification with step >= 1 arrived")
    t_train_phase = next(t for t, p in progress if p["phase"] == "training")
    metrics = result["metrics"]
    manifest = json.loads(Path(result["manifestPath"]).read_text())
    history = manifest["lossHistory"]
    tokens = sum(h["tokens"] for h in history)
    # Client-side cross-check: tokens over the wall time between the notification that opens the
    # training phase and the last step's notification (includes the notifications' own cost).
    client_window = steps[-1][0] - t_train_phase
    return {
        "job_id": job_id,
        "request_to_first_step_s": steps[0][0] - t_send,
        "request_to_training_start_s": t_train_phase - t_send,
        "request_to_result_s": t_result - t_send,
        "metrics": metrics,
        "tokens": tokens,
        "label_tokens": sum(h["labelTokens"] for h in history),
        "tokens_per_s": metrics["tokensPerSecond"],
        "client_tokens_per_s": tokens / client_window if client_window > 0 else None,
        "last_progress_tokens_per_s": steps[-1][1].get("tokensPerSecond"),
        "progress_notifications": len(progress),
        "engine": manifest.get("engine"),
        "dataset": manifest.get("dataset"),
        "step_log": [{"step": h["step"], "loss": h["loss"], "tokens": h["tokens"], "lr": h["learningRate"]}
                     for h in history],
        "adapter_dir": result["adapterPath"],
        "warnings": result.get("warnings", []),
    }
