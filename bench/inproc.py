"""Run ``sidecar.training.train`` inside the current process (for the lever and scaling runs).

The lever and scaling tables measure the engine itself, so they call it directly, as the jobs
layer does, without the stdio round trip. Each run gets a fresh output directory.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_once(params: dict[str, Any], models: Any, workdir: Path, name: str, *, keep: bool = False) -> dict[str, Any]:
    """One engine job from wire-format ``params``; returns the metrics and the engine's own flags.
    ``keep``: leave the adapter in place and return its directory as ``adapter_dir``."""
    import json

    from sidecar import wire
    from sidecar.training import train

    out = workdir / name
    if out.exists():
        shutil.rmtree(out)
    p = wire.decode_params({**params, "outputPath": str(out), "jobId": name}, wire.TrainParams)
    result = train(p, job_id=name, models=models, report=lambda _p: None, should_stop=lambda: False,
                          received_at=time.time())
    manifest = json.loads(Path(result.manifest_path).read_text())
    history = manifest["lossHistory"]
    m = result.metrics
    if not keep:
        shutil.rmtree(out, ignore_errors=True)  # only the figures are kept
    return {
        **({"adapter_dir": str(out)} if keep else {}),
        "tokens_per_s": m.tokens_per_second,
        "tokens": sum(h["tokens"] for h in history),
        "steps": m.steps,
        "training_s": m.training_time / 1000,
        "final_loss": m.final_loss,
        "train_loss": m.train_loss,
        "engine": manifest.get("engine"),
        "dtype": manifest["baseModel"]["dtype"],
    }
