"""Scaling: tokens/s and peak memory against sequence length and LoRA rank.

Every configuration runs in a fresh process (``python -m bench.scaling CONFIG OUT``), so its peak
RSS is its own. A configuration trains on synthetic chat examples of exactly ``length`` tokens
(``bench.dataset.synthetic_examples``) with the engine's defaults: a one-step warm-up job with the
same shapes, then the measured job of ``steps`` optimizer steps at batch 4.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from .common import JobSettings, run_child, write_json

LENGTHS = (128, 256, 512, 1024)
RANKS = (8, 16, 32, 64)
RANK_SWEEP_LENGTH = 256


def configs(settings: JobSettings, *, quick: bool = False) -> list[dict[str, Any]]:
    """Every configuration; ``quick`` (smoke test) keeps only the two smallest of each sweep."""
    lengths, ranks, rank_length = (LENGTHS[:2], RANKS[:2], LENGTHS[0]) if quick else (LENGTHS, RANKS, RANK_SWEEP_LENGTH)
    out = [{"sweep": "length", "length": n, "rank": settings.rank} for n in lengths]
    out += [{"sweep": "rank", "length": rank_length, "rank": r} for r in ranks]
    return out


def run_scaling(settings: JobSettings, model_path: str, workdir: Path, *, steps: int, quick: bool = False,
                timeout: float = 3600) -> list[dict[str, Any]]:
    results = []
    for cfg in configs(settings, quick=quick):
        name = f"{cfg['sweep']}-L{cfg['length']}-r{cfg['rank']}"
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        config_path, out_path, log_path = d / "config.json", d / "result.json", d / "child.log"
        write_json(config_path, {"settings": settings.to_dict(), "model_path": model_path, "workdir": str(d),
                                 "steps": steps, **cfg})
        print(f"scaling {name} ...", file=sys.stderr, flush=True)
        r, _, _, peak_rss_mb = run_child("bench.scaling", config_path, out_path, log_path, threads=settings.threads,
                                         timeout=timeout, what=f"scaling run {name}")
        r.update(cfg)
        r["peak_rss_mb"] = peak_rss_mb
        results.append(r)
        print(f"  {name}: {r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MiB",
              file=sys.stderr, flush=True)
    return results


def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sidecar.models import ModelCache
    from transformers import AutoTokenizer

    from .dataset import synthetic_examples
    from .inproc import train_once

    settings = JobSettings.from_dict(cfg["settings"])
    torch.set_num_threads(settings.threads)
    workdir = Path(cfg["workdir"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    examples = synthetic_examples(tokenizer, cfg["length"], settings.batch_size * cfg["steps"])
    data_path = workdir / "data.jsonl"
    data_path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    params = settings.with_(dataset_path=str(data_path), rank=cfg["rank"], max_steps=None).train_params("unused")
    params.pop("outputPath")
    models = ModelCache(max_models=1)
    train_once({**params, "maxSteps": 1}, models, workdir, "warmup")
    r = train_once(params, models, workdir, "measured")
    r["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return r


if __name__ == "__main__":
    config = json.loads(Path(sys.argv[1]).read_text())
    write_json(Path(sys.argv[2]), _child(config))
