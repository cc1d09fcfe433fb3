"""What both sides of the benchmark share: the job's settings, token counting, and small helpers.

The settings are one frozen dataclass so the baseline child, the sidecar request and the lever runs
are built from the same values and cannot drift apart.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
TRAINING_TEMPLATE = BENCH_DIR / "chatml_training.jinja"

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TOKEN_DEFINITION = (
    "tokens = tokens fed to the model: the sum of each batch's attention mask over every micro-batch "
    "actually run (padding excluded; prompt and system tokens included, they are fed even though they "
    "carry no loss). Identical data and rendering on both sides, so a full epoch is the same count."
)


@dataclass(frozen=True)
class JobSettings:
    """One LoRA job, as both pipelines run it. Defaults are the benchmark's fixed job.

    ``warmup_ratio`` 0.125 gives exactly 2 warm-up steps out of 16 (64 examples / batch 4), so the
    baseline's ceil() and any other rounding agree.
    """

    model: str = "default"
    dataset_path: str = str(BENCH_DIR / "data" / "chat.jsonl")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = tuple(TARGET_MODULES)
    epochs: int = 1
    batch_size: int = 4
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.125
    scheduler: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_length: int = 1024
    seed: int = 42
    max_steps: int | None = None
    threads: int = 2

    def with_(self, **changes: Any) -> "JobSettings":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSettings":
        d = dict(d)
        d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)

    def train_params(self, output_path: str, **extra: Any) -> dict[str, Any]:
        """The sidecar's ``train`` params (camelCase wire names) for this job."""
        params = {
            "baseModel": self.model,
            "datasetPath": self.dataset_path,
            "outputPath": output_path,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targetModules": list(self.target_modules),
            "epochs": self.epochs,
            "batchSize": self.batch_size,
            "gradientAccumulation": 1,
            "learningRate": self.learning_rate,
            "warmupRatio": self.warmup_ratio,
            "scheduler": self.scheduler,
            "weightDecay": self.weight_decay,
            "maxGradNorm": self.max_grad_norm,
            "maxSeqLength": self.max_seq_length,
            "seed": self.seed,
            "lossOn": "assistant",
            "device": "cpu",
            # The engine's default: fp32 weights, and bf16 matmuls where the CPU has native bf16
            # (sidecar/training/bf16.py); the lever table measures dtype float32 against it.
            "dtype": "auto",
        }
        if self.max_steps is not None:
            params["maxSteps"] = self.max_steps
        params.update(extra)
        return params


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that should use exactly ``threads`` compute threads."""
    env = dict(os.environ if base is None else base)
    # LORA_SIDECAR_THREADS is the engine's own setting (applied at each job); the others cover
    # torch's start-up default in the TRL child and any BLAS underneath.
    for name in ("LORA_SIDECAR_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    # Tokenizers' own thread pool would compete with torch for the same cores.
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine, so a child's timestamps can be
    compared with the parent's launch time."""
    return time.monotonic()


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a live process, in MiB; None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"



def run_child(module: str, config_path: Path, out_path: Path, log_path: Path, *, threads: int, timeout: float,
              what: str) -> tuple[dict[str, Any], float, float, float]:
    """Run ``python -m module config out`` with its output in ``log_path``; return (its JSON result,
    launch time, exit time, its own peak RSS in MiB). The peak comes from ``wait4`` on exactly this
    child (RUSAGE_CHILDREN would mix in every child waited for before)."""
    import subprocess
    import sys

    with open(log_path, "wb") as log:
        t_launch = now()
        proc = subprocess.Popen([sys.executable, "-m", module, str(config_path), str(out_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=thread_env(threads))
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"{what} exceeded {timeout:.0f} s; log {log_path}:\n{tail(log_path)}")
            time.sleep(0.05)
        t_exit = now()
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out_path.is_file():
        raise RuntimeError(f"{what} failed (exit {code}); log {log_path}:\n{tail(log_path)}")
    return json.loads(out_path.read_text()), t_launch, t_exit, usage.ru_maxrss / 1024  # Linux: KiB
