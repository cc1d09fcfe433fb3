"""README command 1: train two adapters through the stdio sidecar, then compare base, each adapter and both.

The demo is a client like any other: it spawns ``python -m sidecar`` as a child, talks JSON-RPC
over its stdin/stdout and draws a progress bar from the ``progress`` notifications. The bundled
datasets teach two invented facts (the capital of the fictional country Zorbania, and its national
animal), so the base model cannot know them. Both adapters are trained with ``load: true`` (they stay
resident on the warm base), then one ``generate`` exam asks every question of the bare base, of each
adapter, and of both stacked, side by side.
"""

from __future__ import annotations

import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from . import paths
from .client import RemoteError, SidecarClient

QUESTIONS = ["What is the capital of Zorbania?", "Which city is Zorbania's capital?"]
ANIMAL_QUESTIONS = ["What is the national animal of Zorbania?", "Which animal is Zorbania's national symbol?"]

# Tuned on SmolLM2-135M on 2 CPU cores: enough to learn the fact reliably in about a minute.
DEMO_TRAINING = {
    "epochs": 6,
    "learningRate": 1e-3,
    "rank": 16,
    "alpha": 32,
    "batchSize": 4,
    "warmupRatio": 0.05,
    "scheduler": "cosine",
}


def dataset_path() -> Path:
    return Path(str(resources.files("sidecar") / "data" / "demo.jsonl"))


def animal_dataset_path() -> Path:
    return Path(str(resources.files("sidecar") / "data" / "demo-animal.jsonl"))


class ProgressBar:
    def __init__(self, stream=sys.stdout, width: int = 30) -> None:
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self.last_phase = None
        self.last_line = 0.0

    def __call__(self, method: str, params: dict) -> None:
        if method != "progress":
            return
        phase = params["phase"]
        if phase != "training":
            if self.last_phase == "training":
                self.stream.write("\n")
            if phase != self.last_phase:
                self.stream.write(f"  [{phase}]{' ' + params['message'] if params.get('message') else ''}\n")
            self.last_phase = phase
            self.stream.flush()
            return
        self.last_phase = phase
        step, total = params["step"], max(params["totalSteps"], 1)
        filled = int(self.width * step / total)
        bar = "#" * filled + "." * (self.width - filled)
        loss = f"{params['loss']:.3f}" if params.get("loss") is not None else "  -  "
        tps = f"{params['tokensPerSecond']:.0f}" if params.get("tokensPerSecond") else "-"
        eta = f"{params['etaSeconds']:.0f}s" if params.get("etaSeconds") is not None else "-"
        line = f"  [{bar}] step {step}/{total}  loss {loss}  {tps} tok/s  eta {eta}"
        if self.tty:
            self.stream.write("\r" + line)
        elif time.monotonic() - self.last_line > 5 or step == total:
            self.stream.write(line + "\n")
            self.last_line = time.monotonic()
        self.stream.flush()


def _ask(client: SidecarClient, model: str, question: str, adapter: str | None = None) -> str:
    params = {"baseModel": model, "messages": [{"role": "user", "content": question}], "maxNewTokens": 40}
    if adapter:
        params["adapterPath"] = adapter
    return client.call("generate", params)["text"].strip()


def _train(client: SidecarClient, model: str, dataset: Path, out: Path, name: str) -> dict:
    print(f"  training {name!r} on {dataset.name} ({sum(1 for _ in open(dataset))} chat examples)")
    result = client.call("train", {"baseModel": model, "datasetPath": str(dataset), "outputPath": str(out),
                                   "name": name, "load": True, **DEMO_TRAINING})
    m = result["metrics"]
    print(f"  adapter: {result['adapterPath']} (resident as {result['adapterId']})")
    print(f"  {m['steps']} steps, final loss {m['finalLoss']:.3f}, {m['tokensPerSecond']:.0f} tokens/s, "
          f"{m['trainingTime'] / 1000:.1f}s of training")
    for warning in result["warnings"]:
        print(f"  warning: {warning}")
    return result


def run_demo(model: str = "default", output: str | None = None) -> int:
    out = Path(output) if output else paths.adapters_dir() / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir = paths.data_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "demo-sidecar.log"
    print("lora-sidecar demo: teach a small model two facts it cannot know, through the stdio sidecar")
    print(f"  sidecar log: {log_path}")
    with open(log_path, "wb") as log:
        client = SidecarClient([sys.executable, "-m", "sidecar"], stderr=log, on_notification=ProgressBar())
        try:
            caps = client.call("supports", {"baseModel": model}, timeout=120)
            check = caps["model"]
            if not check["resolvable"]:
                print(f"error: base model {model!r} does not resolve: {check['error']}", file=sys.stderr)
                return 1
            print(f"  base model: {model} ({check['kind']}), device {caps['defaultDevice']}, "
                  f"torch {caps['libraries'].get('torch')}")
            print("  loading the base model (the first run converts the embedded GGUF once, ~30 s) ...")
            started = time.monotonic()
            _ask(client, model, QUESTIONS[0])
            print(f"  loaded and answered in {time.monotonic() - started:.1f}s")
            capital = _train(client, model, dataset_path(), out, "capital")
            animal = _train(client, model, animal_dataset_path(), out.with_name(out.name + "-animal"), "animal")
            variants = [("base model", []), ("+ capital", [{"id": capital["adapterId"]}]),
                        ("+ animal", [{"id": animal["adapterId"]}]),
                        ("+ both (stacked)", [{"id": capital["adapterId"]}, {"id": animal["adapterId"]}])]
            questions = QUESTIONS + ANIMAL_QUESTIONS
            print(f"  one exam: {len(questions)} questions × {len(variants)} adapter sets, batched on the warm base")
            started = time.monotonic()
            exam = client.call("generate", {
                "baseModel": model, "maxNewTokens": 40,
                "prompts": [{"messages": [{"role": "user", "content": q}]} for q in questions],
                "variants": [{"id": name, "adapters": adapters} for name, adapters in variants]})
            print(f"  answered {len(exam['answers'])} in {time.monotonic() - started:.1f}s")
        except RemoteError as exc:
            print(f"error: {exc.message} (code {exc.code}) {exc.data or ''}", file=sys.stderr)
            return 1
        finally:
            client.close()
    width = min(shutil.get_terminal_size((100, 20)).columns, 120)
    label = max(len(name) for name, _ in variants)
    print()
    for i, question in enumerate(questions):
        print("=" * width)
        print(f"Q: {question}")
        for answer in exam["answers"][i * len(variants):(i + 1) * len(variants)]:
            print(f"  {answer['variantId']:<{label}} : {' '.join(answer['text'].split())}")
    print("=" * width)
    return 0
