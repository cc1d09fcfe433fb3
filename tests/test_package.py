"""The application's adapter package files (issue 22, adapters/package.py) through the real process.

Every adapter directory the sidecar writes — ``train``, ``train`` with ``initFrom``, ``adapters/compose``
— holds ``manifest.json`` (the application's adapter package manifest) and ``training_metrics.json``,
plus ``quantization_info.json`` for a job that asked for QLoRA; with the adapter, or not at all.

Checked here, on the tiny model: the shapes (exact key sets), ``contentHash`` against our own sha256 of
``adapter_model.safetensors`` (a tampered copy fails the same check: the planted error), ``lossHistory``
one loss a step and equal to the training manifest's, ``source`` trained / refined / composed, the
default folder ``{personaName}-{traitType}-{stamp}``, and crash safety: a failure planted in the package
writer (after its first file) and a kill -9 in ``saving`` leave no output directory without its package.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from tests.sidecar_proc import Sidecar, chat_dataset

MANIFEST_KEYS = {"id", "name", "traitType", "source", "baseModel", "rank", "sizeMB", "personaId", "personaName",
                 "trainingMetadata", "contentHash", "createdAt", "version"}
METADATA_KEYS = {"epochs", "loss", "trainingDuration", "datasetHash", "lossHistory", "examplesProcessed"}
METRICS_KEYS = {"finalLoss", "lossHistory", "trainRuntime", "examplesProcessed"}
QUANT_KEYS = {"enabled", "bits", "type", "doubleQuant", "computeDtype"}
PERSONA = {"personaId": "6f1c2b1e-6d3a-4c55-9a51-0d7f3b1f4e21", "personaName": "Helper AI", "traitType": "tone"}
STEPS = 3


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_problems(directory: Path) -> list[str]:
    """What is wrong with ``directory``'s package, as the application would meet it (empty: nothing)."""
    problems = []
    manifest = json.loads((directory / "manifest.json").read_text())
    if set(manifest) - {"quantization"} != MANIFEST_KEYS:
        problems.append(f"manifest keys {sorted(manifest)}")
    for key in ("id", "name", "source", "sizeMB", "contentHash"):
        if manifest.get(key) in (None, ""):
            problems.append(f"{key} undefined")
    if manifest.get("contentHash") != "sha256:" + sha256_hex(directory / "adapter_model.safetensors"):
        problems.append("contentHash does not match adapter_model.safetensors")
    files = [p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json"]
    if manifest.get("sizeMB") != round(sum(p.stat().st_size for p in files) / 2**20, 2):
        problems.append(f"sizeMB {manifest.get('sizeMB')}")
    try:
        uuid.UUID(manifest.get("id", ""))
        datetime.fromisoformat(manifest.get("createdAt", "").replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        problems.append("id is not a UUID or createdAt is not ISO 8601")
    if manifest.get("version") != 1 or set(manifest.get("trainingMetadata", {})) - {"datasetHash"} != (
            METADATA_KEYS - {"datasetHash"}):
        problems.append("version or trainingMetadata keys")
    metrics = json.loads((directory / "training_metrics.json").read_text())
    if set(metrics) != METRICS_KEYS or metrics["lossHistory"] != manifest["trainingMetadata"]["lossHistory"]:
        problems.append("training_metrics.json")
    quant = directory / "quantization_info.json"
    if quant.exists() and (set(json.loads(quant.read_text())) != QUANT_KEYS
                           or json.loads(quant.read_text()) != manifest.get("quantization")):
        problems.append("quantization_info.json")
    return problems


def train(proc: Sidecar, params: dict, timeout: float = 300) -> dict:
    response = proc.call("train", params, timeout=timeout)
    assert "result" in response, (response, proc.stderr()[-3000:])
    return response["result"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("package-data")


@pytest.fixture(scope="module")
def proc(data_dir):
    with Sidecar(env={"LORA_SIDECAR_DATA": str(data_dir)}) as p:
        yield p


def base_params(model: Path, **extra) -> dict:
    return {"baseModel": str(model), "dataset": chat_dataset(6), "rank": 4, "alpha": 8, "batchSize": 2,
            "maxSteps": STEPS, "maxSeqLength": 64, "learningRate": 1e-3, "progressInterval": 0, **extra}


@pytest.fixture(scope="module")
def trained(proc, tiny_model_dir, data_dir) -> dict:
    """A train job with the persona fields and no outputPath (so the default folder is used)."""
    return train(proc, base_params(tiny_model_dir, **PERSONA))


def test_train_writes_the_package_into_the_persona_default_folder(trained, data_dir, tiny_model_dir):
    out = Path(trained["adapterPath"])
    assert out.parent == (data_dir / "adapters").absolute()
    assert re.fullmatch(r"Helper-AI-tone-\d{8}T\d{6}Z", out.name), out.name
    assert package_problems(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "training_metrics.json").read_text())
    training = json.loads((out / "training_manifest.json").read_text())
    m = trained["metrics"]
    assert manifest["name"] == "helper-ai-tone" and manifest["source"] == "trained"
    assert (manifest["personaId"], manifest["personaName"], manifest["traitType"]) == tuple(PERSONA.values())
    assert manifest["baseModel"] == str(tiny_model_dir) and manifest["rank"] == 4 and "quantization" not in manifest
    assert not (out / "quantization_info.json").exists()
    meta = manifest["trainingMetadata"]
    # One loss a step, exactly the training manifest's (JSON floats round-trip exactly).
    assert m["steps"] == STEPS and len(meta["lossHistory"]) == STEPS
    assert meta["lossHistory"] == [h["loss"] for h in training["lossHistory"]] == metrics["lossHistory"]
    assert meta["loss"] == metrics["finalLoss"] == m["finalLoss"] == meta["lossHistory"][-1]
    # examplesProcessed: examples the trainer went through, repeats counted (3 steps x batch 2 of 6 examples).
    assert meta["examplesProcessed"] == metrics["examplesProcessed"] == m["examplesProcessed"] == STEPS * 2
    assert meta["epochs"] == m["epochs"] and meta["trainingDuration"] == m["trainingTime"]
    assert abs(metrics["trainRuntime"] - m["trainingTime"] / 1000) <= 0.001  # ms vs s, each rounded
    assert meta["datasetHash"] == "sha256:" + training["dataset"]["sha256"]
    # training_manifest.json stays the sidecar's own record, unchanged in shape.
    assert training["format"] == "lora-sidecar.training-manifest/1" and "contentHash" not in training
    assert training["adapter"]["sha256"] == manifest["contentHash"].removeprefix("sha256:")


def test_a_tampered_adapter_fails_the_content_hash_check(trained, tmp_path):
    """The planted error: one byte of the weights changed after the manifest was written."""
    copy = Path(shutil.copytree(trained["adapterPath"], tmp_path / "copy"))
    assert package_problems(copy) == []
    weights = copy / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    assert "contentHash does not match adapter_model.safetensors" in package_problems(copy)


def test_init_from_is_refined_and_keeps_the_parents_persona(proc, trained, tiny_model_dir, tmp_path):
    out = tmp_path / "child"
    child = train(proc, base_params(tiny_model_dir, maxSteps=2, initFrom=trained["adapterPath"], outputPath=str(out)))
    assert package_problems(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    parent = json.loads((Path(trained["adapterPath"]) / "manifest.json").read_text())
    assert manifest["source"] == "refined" and manifest["id"] != parent["id"]
    assert (manifest["personaId"], manifest["personaName"], manifest["traitType"]) == tuple(PERSONA.values())
    assert len(manifest["trainingMetadata"]["lossHistory"]) == child["metrics"]["steps"] == 2


def test_compose_is_composed_with_no_training_figures(proc, trained, tmp_path):
    out = tmp_path / "composed"
    response = proc.call("adapters/compose", {"sources": [{"path": trained["adapterPath"], "weight": 0.5}],
                                              "method": "cat", "outputPath": str(out)}, timeout=120)
    assert "result" in response, response
    assert package_problems(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert manifest["source"] == "composed" and manifest["rank"] == response["result"]["rank"] == 4
    assert manifest["personaName"] == "Helper AI" and manifest["name"] == "helper-ai-tone"
    meta = manifest["trainingMetadata"]
    assert (meta["epochs"], meta["loss"], meta["lossHistory"], meta["examplesProcessed"]) == (0, None, [], 0)
    assert (metrics["finalLoss"], metrics["lossHistory"], metrics["examplesProcessed"]) == (None, [], 0)
    assert manifest["contentHash"] == "sha256:" + response["result"]["sha256"]


def test_a_quantize_request_writes_quantization_info(proc, tiny_model_dir, tmp_path):
    """Without CUDA the base is not quantized (a warning says so): ``enabled`` says what really happened."""
    out = tmp_path / "q"
    train(proc, base_params(tiny_model_dir, maxSteps=1, quantize=True, outputPath=str(out)))
    assert package_problems(out) == []
    info = json.loads((out / "quantization_info.json").read_text())
    loaded_bits = json.loads((out / "training_manifest.json").read_text())["baseModel"]["quantizeBits"]
    quantized = loaded_bits is not None  # without CUDA + bitsandbytes the base loads unquantized (warned)
    assert info == {"enabled": quantized, "bits": 4, "type": "nf4", "doubleQuant": False,
                    "computeDtype": info["computeDtype"]}
    assert json.loads((out / "manifest.json").read_text())["quantization"] == info
    if not quantized:
        assert info["computeDtype"] == "float32"
    # No persona fields: the package name is the output folder's, persona fields empty strings.
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["name"], manifest["personaName"], manifest["traitType"]) == ("q", "", "")


# --- crash safety: never a package without its adapter, never an adapter without its package -----------

BROKEN_WRITER = [sys.executable, "-c", "\n".join([
    "import sys",
    "from sidecar.adapters import package",
    "real = package._write_json",
    "def broken(path, doc):",
    "    real(path, doc)",
    "    if path.name == 'training_metrics.json':",
    "        raise RuntimeError('planted: the package writer fails after its first file')",
    "package._write_json = broken",
    "from sidecar.cli import main",
    "sys.exit(main())"])]


def test_a_failing_package_writer_publishes_nothing(trained, tiny_model_dir, tmp_path):
    """A failure planted after ``training_metrics.json`` was written: neither train nor compose leaves an
    output directory (nor its temporary one) behind."""
    with Sidecar(argv=BROKEN_WRITER, env={"LORA_SIDECAR_DATA": str(tmp_path / "data")}) as p:
        response = p.call("train", base_params(tiny_model_dir, maxSteps=1, outputPath=str(tmp_path / "t")), timeout=300)
        assert "planted" in response["error"]["message"], response
        response = p.call("adapters/compose", {"sources": [{"path": trained["adapterPath"], "weight": 1.0}],
                                               "method": "cat", "outputPath": str(tmp_path / "c")}, timeout=120)
        assert "error" in response, response
        assert "planted" in p.stderr() or "planted" in response["error"]["message"]
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name in ("manifest.json", "training_metrics.json")]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_kill_9_in_saving_leaves_the_whole_package_or_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "adapters" / "out"
    with Sidecar(env={"LORA_SIDECAR_DATA": str(tmp_path / "data")}) as p:
        p.call("status")
        p.request("train", base_params(tiny_model_dir, maxSteps=2, outputPath=str(out)))
        deadline = time.monotonic() + 300
        while not (out.exists() or (out.parent.exists() and any(out.parent.glob("out.tmp-*")))):
            assert time.monotonic() < deadline, p.stderr()[-3000:]
            time.sleep(0.001)
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(10)
    if out.exists():
        names = {q.name for q in out.iterdir()}
        assert {"adapter_model.safetensors", "manifest.json", "training_metrics.json"} <= names, names
        assert package_problems(out) == []
