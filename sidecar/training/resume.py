"""``resumeFrom`` and ``initFrom``: what a job continues from, and what it may not change.

Request time (the server, no torch): ``prepare_request`` fills a resume request from the job's own
stored params (``params.json``) — a client may send just ``{resumeFrom: jobId}`` — and refuses a
request that changes a field that changes the result (ResumeMismatch, naming each field). For
``initFrom`` it takes rank, alpha and targets from the parent adapter and refuses a request that
says otherwise.

Job time (the recipe): ``check_resume`` compares what only the job can know — the dataset contents
(sha256 of the examples) and the base model's fingerprint — with the checkpoint's.

May differ on resume (they do not change the maths, or only the float rounding of summing
micro-batches): outputPath, name, jobId (with a checkpoint path only), progressInterval, persona
fields, microBatchTokens, gradientCheckpointing, trustRemoteCode, checkpointEvery,
checkpointSeconds, keepCheckpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import msgspec

from .. import errors, wire
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, MANIFEST_FILE, sha256_file
from . import checkpoint

RESULT_FIELDS = (
    "base_model", "rank", "alpha", "dropout", "target_modules", "use_rslora", "use_dora", "epochs", "max_steps",
    "learning_rate", "batch_size", "gradient_accumulation", "max_seq_length", "warmup_ratio", "scheduler",
    "weight_decay", "max_grad_norm", "seed", "loss_on", "group_by_length", "validation_split", "quantize",
    "quantize_bits", "device", "dtype", "init_from", "early_stopping", "eval_every",
)
"""TrainParams fields that change the trained adapter. Dataset contents are compared by hash."""

_TRAIN_SOURCES = ("dataset", "datasetPath")
_VALIDATION_SOURCES = ("validationDataset", "validationPath", "validationSplit")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def result_params(params: wire.TrainParams) -> dict[str, Any]:
    """The result-affecting fields of ``params`` as JSON values (camelCase), stored in each checkpoint."""
    return {_camel(f): msgspec.to_builtins(getattr(params, f)) for f in RESULT_FIELDS}


def differences(stored: dict[str, Any], params: wire.TrainParams) -> list[dict[str, Any]]:
    now = result_params(params)
    return [{"field": k, "checkpoint": stored.get(k), "request": now[k]} for k in now if stored.get(k) != now[k]]


def mismatch(job: str, differs: list[dict[str, Any]]) -> errors.ResumeMismatch:
    listed = ", ".join(f"{d['field']} ({_short(d['checkpoint'])} → {_short(d['request'])})" for d in differs)
    return errors.ResumeMismatch(
        f"Cannot resume {job}: the request changes {listed}, which would change the result. Resume with the "
        "job's own values (omit them) or start a new job.", differs=differs)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Request time
# ---------------------------------------------------------------------------------------------

def prepare_request(raw: Any, params: wire.TrainParams) -> wire.TrainParams:
    """Resolve ``resumeFrom`` and ``initFrom`` of a decoded ``train`` request (``raw``: its params)."""
    raw = raw if isinstance(raw, dict) else {}
    if params.resume_from is not None:  # its stored params already carry the parent's LoRA shape
        return _prepare_resume(raw, params)
    if params.init_from is not None:
        return _prepare_init(raw, params)
    return params


def _prepare_resume(raw: dict[str, Any], params: wire.TrainParams) -> wire.TrainParams:
    target = params.resume_from
    ckpt, job_dir = checkpoint.locate(target)
    doc = checkpoint.load_params(job_dir)
    if doc is None:
        raise errors.CheckpointNotFound(f"{job_dir} holds no params.json; cannot resume {target!r}", path=str(job_dir))
    stored_raw = dict(doc["params"])
    by_id = not Path(target).expanduser().is_dir()
    if by_id and raw.get("jobId") not in (None, doc["jobId"]):
        raise errors.InvalidParams(f"resumeFrom names job {doc['jobId']!r}, which keeps its id: omit jobId",
                                   field="$.jobId")
    overlay = {k: v for k, v in raw.items() if k != "resumeFrom"}
    for group in (_TRAIN_SOURCES, _VALIDATION_SOURCES):
        if any(k in overlay for k in group):
            for k in group:
                stored_raw.pop(k, None)
    merged_raw = {**stored_raw, **overlay, "jobId": overlay.get("jobId") or doc["jobId"]}
    merged_raw["resumeFrom"] = str(ckpt if ckpt is not None else job_dir)
    merged = wire.decode_params(merged_raw, wire.TrainParams)
    stored = wire.decode_params(stored_raw, wire.TrainParams)
    differs = differences(result_params(stored), merged)
    if differs:
        raise mismatch(f"job {doc['jobId']!r}", differs)
    return merged


def _prepare_init(raw: dict[str, Any], params: wire.TrainParams) -> wire.TrainParams:
    parent = read_parent(params.init_from)
    adopted = parent.apply(params)
    for field in ("rank", "alpha", "targetModules", "useRslora", "useDora"):
        if field in raw and raw[field] is not None:
            mine = msgspec.to_builtins(getattr(adopted, _snake(field)))
            theirs = raw[field]
            if field == "targetModules":
                mine, theirs = sorted(mine), sorted(theirs)
            if mine != theirs:
                raise errors.InvalidParams(
                    f"{field} comes from the initFrom adapter ({mine}); omit it or pass the same value",
                    field=f"$.{field}")
    return adopted


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


# ---------------------------------------------------------------------------------------------
# initFrom: the parent adapter
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParentAdapter:
    path: Path
    config: dict[str, Any]
    manifest: Optional[dict[str, Any]]
    sha256: str

    def apply(self, params: wire.TrainParams) -> wire.TrainParams:
        """``params`` with the LoRA shape of the parent (rank, alpha, targets, rsLoRA, DoRA)."""
        c = self.config
        return msgspec.structs.replace(
            params, rank=int(c["r"]), alpha=float(c["lora_alpha"]), target_modules=sorted(c["target_modules"]),
            use_rslora=bool(c.get("use_rslora", False)), use_dora=bool(c.get("use_dora", False)),
            init_from=str(self.path))

    @property
    def base_fingerprint(self) -> Optional[str]:
        return ((self.manifest or {}).get("baseModel") or {}).get("fingerprint")

    def record(self) -> dict[str, Any]:
        """The manifest's ``parent``."""
        m = self.manifest or {}
        return {"path": str(self.path), "sha256": self.sha256, "jobId": m.get("jobId"),
                "baseFingerprint": self.base_fingerprint,
                "manifestSha256": sha256_file(self.path / MANIFEST_FILE) if self.manifest else None}


def read_parent(path: str) -> ParentAdapter:
    adapter = Path(path).expanduser().absolute()
    config_file, weights = adapter / ADAPTER_CONFIG, adapter / ADAPTER_FILE
    if not config_file.is_file() or not weights.is_file():
        why = "does not exist" if not adapter.exists() else f"has no {ADAPTER_CONFIG} and {ADAPTER_FILE}"
        raise errors.AdapterNotFound(f"initFrom adapter {path} {why}", path=str(path), field="initFrom")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise errors.AdapterNotFound(f"initFrom adapter {path}: {ADAPTER_CONFIG} cannot be read: {exc}",
                                     path=str(path), field="initFrom") from None
    if config.get("peft_type") not in (None, "LORA") or not config.get("target_modules"):
        raise errors.AdapterMismatch(f"initFrom adapter {path} is not a LoRA adapter with target modules",
                                     path=str(path))
    if isinstance(config["target_modules"], str):
        raise errors.AdapterMismatch(f"initFrom adapter {path} names its targets by a pattern "
                                     f"({config['target_modules']!r}); only lists are supported", path=str(path))
    manifest = None
    try:
        manifest = json.loads((adapter / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        pass
    return ParentAdapter(adapter, config, manifest if isinstance(manifest, dict) else None, sha256_file(weights))


def check_parent_base(parent: ParentAdapter, fingerprint: str, base_name: str) -> None:
    """The parent must have been trained on this very base model (fingerprint from its manifest)."""
    theirs = parent.base_fingerprint
    if theirs is not None and theirs != fingerprint:
        trained_on = ((parent.manifest or {}).get("baseModel") or {}).get("name")
        raise errors.AdapterMismatch(
            f"initFrom adapter {parent.path} was trained on another base model ({trained_on!r}, fingerprint "
            f"{theirs[:12]}…) than {base_name!r} (fingerprint {fingerprint[:12]}…)",
            path=str(parent.path), adapterBase=theirs, baseModel=fingerprint)


def load_parent_weights(peft_model: Any, parent: ParentAdapter) -> None:
    """Copy the parent's LoRA weights into the freshly attached adapter; every tensor must fit."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(parent.path / ADAPTER_FILE))
    expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as exc:  # size mismatch: another architecture
        raise errors.AdapterMismatch(f"initFrom adapter {parent.path} does not fit this base model: {exc}",
                                     path=str(parent.path)) from None
    missing = sorted(set(getattr(result, "missing_keys", [])) & expected)
    unexpected = sorted(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise errors.AdapterMismatch(
            f"initFrom adapter {parent.path} does not fit this base model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}", path=str(parent.path))


# ---------------------------------------------------------------------------------------------
# Job time
# ---------------------------------------------------------------------------------------------

def check_resume(state: dict[str, Any], params: wire.TrainParams, *, job_id: str, train_sha256: str,
                 validation_sha256: Optional[str]) -> None:
    """Refuse (ResumeMismatch) when the params or the dataset contents differ from the checkpoint's."""
    differs = differences(state["params"], params)
    for name, theirs, mine in (("dataset contents (sha256)", state["datasetSha256"], train_sha256),
                               ("validation contents (sha256)", state.get("validationSha256"), validation_sha256)):
        if theirs != mine:
            differs.append({"field": name, "checkpoint": theirs, "request": mine})
    if differs:
        raise mismatch(f"job {state.get('jobId', job_id)!r} from {state.get('path', 'its checkpoint')}", differs)


def check_resume_base(state: dict[str, Any], fingerprint: str) -> None:
    if state["baseFingerprint"] != fingerprint:
        raise mismatch(f"job {state.get('jobId')!r}", [{"field": "base model (fingerprint)",
                                                        "checkpoint": state["baseFingerprint"],
                                                        "request": fingerprint}])
