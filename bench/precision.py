"""The bf16-matmul lever's effect on adapter quality: the same job at equal tokens, fp32 against bf16 matmuls.

    bootstrap/train-wrapper.sh -m bench.precision [--shapes chat,short,long] [--out FILE]

For each data shape, one process trains the benchmark's job twice in-process (``dtype: "float32"``,
then the default ``dtype: "auto"``, which takes bf16 matmuls on a CPU with native bf16: see
sidecar/training/bf16.py) on the same data, seed and batch order, and scores both adapters with the
benchmark's common scorer (bench/evaluate.py: fp32, stock PEFT, full logits, the whole dataset).
Prints and writes tokens/s, the logged mean training loss and the scored loss of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .common import JobSettings, write_json
from .dataset import SHAPES
from .evaluate import evaluate
from .inproc import train_once


def run(shapes: list[str], threads: int) -> dict:
    import torch

    from sidecar.models import ModelCache, cpu_has_native_bf16

    torch.set_num_threads(threads)
    models = ModelCache(max_models=1)
    base = JobSettings(threads=threads).train_params("unused")
    base.pop("outputPath")
    out: dict = {"threads": threads, "native_bf16": cpu_has_native_bf16(), "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_once({**base, "maxSteps": 1}, models, work, "warmup")  # loads the model, makes the bf16 copies
        for name in shapes:
            params = {**base, "datasetPath": str(SHAPES[name][0])}
            rows, adapters = {}, {}
            for dtype in ("float32", "auto"):
                print(f"{name}: dtype {dtype} ...", file=sys.stderr, flush=True)
                rows[dtype] = train_once({**params, "dtype": dtype}, models, work, f"{name}-{dtype}", keep=True)
                adapters[dtype] = rows[dtype].pop("adapter_dir")
            scored = evaluate(models.entries()[0].resolved.path, params["datasetPath"], adapters, threads=threads)
            for dtype, row in rows.items():
                row["scored_loss"] = scored["losses"][dtype]
            out["shapes"][name] = {"rows": rows, "base_model_loss": scored["losses"]["base_model"],
                                   "scored_loss_difference": scored["losses"]["auto"] - scored["losses"]["float32"],
                                   "speedup": rows["auto"]["tokens_per_s"] / rows["float32"]["tokens_per_s"]}
            s = out["shapes"][name]
            print(f"{name}: float32 {rows['float32']['tokens_per_s']:.1f} tokens/s, loss {rows['float32']['scored_loss']:.5f}; "
                  f"auto {rows['auto']['tokens_per_s']:.1f} tokens/s ({rows['auto']['engine']['bf16MatmulLayers']} bf16 "
                  f"layers), loss {rows['auto']['scored_loss']:.5f} (Δ {s['scored_loss_difference']:+.5f}, "
                  f"×{s['speedup']:.2f})", flush=True)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/precision.json"))
    a = p.parse_args()
    write_json(a.out, run([s.strip() for s in a.shapes.split(",") if s.strip()], a.threads))
    print(f"JSON: {a.out}")
