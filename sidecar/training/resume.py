"""``resumeFrom`` and ``initFrom``: what a job continues from, and what it may not change.

Request time (the door, no torch): ``prepare_request`` locates ``resumeFrom`` once and fills the
request from the job's own stored params (``params.json``) — a client may send just
``{resumeFrom: jobId}`` — refusing a request that changes a field that changes the result
(ResumeMismatch, naming each field). The prepared params carry what it found: ``resumeFrom`` becomes
the checkpoint directory (or the job directory when the job had none yet). For ``initFrom`` it reads
the parent's config, takes rank, alpha and targets from it and refuses a request that says otherwise.

Job time (the recipe, which trusts the prepared params): ``resume_point`` reads the checkpoint the
door found, ``read_parent`` reads the parent adapter (weights and all, once), and ``check_resume`` /
``check_resume_base`` / ``check_parent_base`` compare what only the job can know — the dataset
contents (sha256 of the examples) and the base model's fingerprint — with the checkpoint's or parent's.

May differ on resume (they do not change the maths, or only the float rounding of summing
micro-batches): outputPath, name, jobId (with a checkpoint path only), progressInterval, persona
fields, microBatchTokens, gradientCheckpointing, trustRemoteCode, tensorboard, checkpointEvery,
checkpointSeconds, keepCheckpoints, and distributed as long as batchSize × processes stays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import msgspec

from .. import errors, jobdir, wire
from ..adapters import fit

RESULT_FIELDS = (
    "base_model", "rank", "alpha", "dropout", "target_modules", "use_rslora", "use_dora", "epochs", "max_steps",
    "learning_rate", "batch_size", "gradient_accumulation", "max_seq_length", "warmup_ratio", "scheduler",
    "weight_decay", "max_grad_norm", "seed", "loss_on", "group_by_length", "validation_split", "quantize",
    "quantize_bits", "device", "dtype", "init_from", "early_stopping", "eval_every",
)
"""TrainParams fields that change the trained adapter. Dataset contents are compared by hash."""

_FIELDS = {f.name: f for f in msgspec.structs.fields(wire.TrainParams)}
_WIRE_NAME = {name: f.encode_name for name, f in _FIELDS.items()}
"""TrainParams field → its name on the wire (``use_rslora`` → ``useRslora``)."""
_BY_WIRE_NAME = {wire_name: name for name, wire_name in _WIRE_NAME.items()}

_SOURCES = (("dataset", "dataset_path"), ("validation_dataset", "validation_path", "validation_split"))
"""A request that gives any field of a group replaces the stored job's whole group."""
_LORA_SHAPE = ("rank", "alpha", "target_modules", "use_rslora", "use_dora")


def result_params(params: wire.TrainParams) -> dict[str, Any]:
    """The result-affecting fields of ``params`` as JSON values (wire names), stored in each checkpoint,
    with ``processes``: how many processes share each step (1 without ``distributed``)."""
    processes = params.distributed.processes if params.distributed is not None else 1
    return {**{_WIRE_NAME[f]: msgspec.to_builtins(getattr(params, f)) for f in RESULT_FIELDS}, "processes": processes}


def differences(stored: dict[str, Any], params: wire.TrainParams) -> list[dict[str, Any]]:
    """The result-affecting differences between a stored job's params and ``params``. The number of
    processes may change when the global batch (``batchSize × processes``) stays: each step then takes
    the same examples (docs/SCALING.md); a checkpoint from before ``processes`` was stored had one."""
    now = result_params(params)
    differs = [{"field": k, "checkpoint": stored.get(k), "request": now[k]} for k in now
               if k not in ("batchSize", "processes") and stored.get(k) != now[k]]
    theirs = (stored.get("batchSize"), stored.get("processes", 1))
    mine = (now["batchSize"], now["processes"])
    if theirs != mine and theirs[0] * theirs[1] != mine[0] * mine[1]:
        differs.append({"field": "global batch (batchSize × processes)", "checkpoint": theirs[0] * theirs[1],
                        "request": mine[0] * mine[1]})
    return differs


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
    """Resolve ``resumeFrom`` and ``initFrom`` of a decoded ``train`` request.

    ``raw``: the request's params as sent (only which names it gives is read: a field sent with its
    default value still counts as given). None: the fields that differ from their defaults count as
    given — for a caller that has no raw params."""
    given = _given(raw, params)
    if params.resume_from is not None:  # its stored params already carry the parent's LoRA shape
        return _prepare_resume(given, params)
    if params.init_from is not None:
        return _prepare_init(given, params)
    return params


def _given(raw: Any, params: wire.TrainParams) -> set[str]:
    """The TrainParams fields the client gave."""
    if isinstance(raw, dict):
        return {_BY_WIRE_NAME[k] for k in raw if k in _BY_WIRE_NAME}
    if raw is not None:
        return set()
    return {name for name, f in _FIELDS.items() if getattr(params, name) != _default(f)}


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is msgspec.NODEFAULT else f.default


def _prepare_resume(given: Iterable[str], params: wire.TrainParams) -> wire.TrainParams:
    target = params.resume_from
    ckpt, job_dir = jobdir.locate(target)
    doc = jobdir.load_params(job_dir)
    if doc is None:
        raise errors.CheckpointNotFound(f"{job_dir} holds no params.json; cannot resume {target!r}", path=str(job_dir))
    by_id = not Path(target).expanduser().is_dir()
    if by_id and params.job_id not in (None, doc["jobId"]):
        raise errors.InvalidParams(f"resumeFrom names job {doc['jobId']!r}, which keeps its id: omit jobId",
                                   field="$.jobId")
    changes = {name: getattr(params, name) for name in given if name != "resume_from"}
    replaced = [name for group in _SOURCES if any(n in changes for n in group) for name in group]
    stored = msgspec.structs.replace(wire.decode_params(doc["params"], wire.TrainParams),
                                     **{name: _default(_FIELDS[name]) for name in replaced})
    merged = msgspec.structs.replace(stored, **{
        **changes, "job_id": params.job_id or doc["jobId"], "resume_from": str(ckpt if ckpt is not None else job_dir)})
    differs = differences(result_params(stored), merged)
    if differs:
        raise mismatch(f"job {doc['jobId']!r}", differs)
    return merged


def _prepare_init(given: Iterable[str], params: wire.TrainParams) -> wire.TrainParams:
    adapter_dir, config = fit.read_config(params.init_from, field="initFrom", what="initFrom adapter")
    _check_parent_config(params.init_from, config)
    adopted = adopt(params, adapter_dir, config)
    for name in _LORA_SHAPE:
        if name in given and getattr(params, name) is not None:
            mine, theirs = msgspec.to_builtins(getattr(adopted, name)), msgspec.to_builtins(getattr(params, name))
            if name == "target_modules":
                mine, theirs = sorted(mine), sorted(theirs)
            if mine != theirs:
                raise errors.InvalidParams(
                    f"{_WIRE_NAME[name]} comes from the initFrom adapter ({mine}); omit it or pass the same value",
                    field=f"$.{_WIRE_NAME[name]}")
    return adopted


def _check_parent_config(path: str, config: dict[str, Any]) -> None:
    """AdapterUnsupported unless the parent is a LoRA adapter that lists its target modules."""
    if config.get("peft_type") not in (None, "LORA") or not config.get("target_modules"):
        raise errors.AdapterUnsupported(f"initFrom adapter {path} is not a LoRA adapter with target modules",
                                        path=str(path))
    if isinstance(config["target_modules"], str):
        raise errors.AdapterUnsupported(f"initFrom adapter {path} names its targets by a pattern "
                                        f"({config['target_modules']!r}); only lists are supported", path=str(path))


def adopt(params: wire.TrainParams, adapter_dir: Path, config: dict[str, Any]) -> wire.TrainParams:
    """``params`` with the LoRA shape of the parent (rank, alpha, targets, rsLoRA, DoRA)."""
    return msgspec.structs.replace(
        params, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
        target_modules=sorted(config["target_modules"]), use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)), init_from=str(adapter_dir))


# ---------------------------------------------------------------------------------------------
# Job time
# ---------------------------------------------------------------------------------------------

def resume_point(params: wire.TrainParams) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """(checkpoint, its state with every file verified) that the door located for ``resumeFrom``, or
    (None, None) when the job does not resume or resumes a job that had no checkpoint yet (the door
    left its job directory): it runs again from step 0."""
    if params.resume_from is None:
        return None, None
    path = Path(params.resume_from)
    if not (path / jobdir.STATE_FILE).is_file() and (path / jobdir.PARAMS_FILE).is_file():
        return None, None
    return path, jobdir.read_state(path)


@dataclass(frozen=True, eq=False)
class ParentAdapter:
    """The ``initFrom`` adapter as the job reads it: config, manifest and weights, read once."""

    path: Path
    config: dict[str, Any]
    manifest: Optional[dict[str, Any]]
    sha256: str
    """Of exactly the weights bytes that ``tensors`` were read from."""
    manifest_sha256: Optional[str]
    tensors: dict[str, Any]

    def apply(self, params: wire.TrainParams) -> wire.TrainParams:
        """``params`` with the LoRA shape of the parent (the door has done this already)."""
        return adopt(params, self.path, self.config)

    @property
    def base_fingerprint(self) -> Optional[str]:
        return ((self.manifest or {}).get("baseModel") or {}).get("fingerprint")

    def record(self) -> dict[str, Any]:
        """The manifest's ``parent``."""
        m = self.manifest or {}
        return {"path": str(self.path), "sha256": self.sha256, "jobId": m.get("jobId"),
                "baseFingerprint": self.base_fingerprint,
                "manifestSha256": self.manifest_sha256 if self.manifest else None}


def read_parent(path: str) -> ParentAdapter:
    """The adapter at ``params.init_from`` (a complete LoRA pair per module, else AdapterInvalid)."""
    files = fit.read(path, field="initFrom", what="initFrom adapter")
    flat = fit.tensors(files)
    fit.check_pairs(files, fit.split_lora(flat)[0])
    return ParentAdapter(files.dir, files.config, files.manifest, files.sha256, files.manifest_sha256, flat)


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

    expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(peft_model, parent.tensors)
    except RuntimeError as exc:  # size mismatch: another architecture
        raise errors.AdapterMismatch(f"initFrom adapter {parent.path} does not fit this base model: {exc}",
                                     path=str(parent.path)) from None
    missing = sorted(set(getattr(result, "missing_keys", [])) & expected)
    unexpected = sorted(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise errors.AdapterMismatch(
            f"initFrom adapter {parent.path} does not fit this base model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}", path=str(parent.path))


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
