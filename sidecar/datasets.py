"""Datasets: reading the examples of a train request (inline or JSONL) and checking their structure.

``load_train_and_validation(params)`` reads the examples (inline ``dataset`` or a JSONL
``datasetPath``; validation from ``validationDataset`` / ``validationPath`` / ``validationSplit``)
and checks their structure. It needs no tokenizer, so a bad dataset is rejected before any model is
loaded. Every problem is a ``DatasetInvalid`` whose data names ``source``, the example (``index``,
0-based, inline; ``line``, 1-based, JSONL) and the ``field``. No torch.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import msgspec

from . import wire
from .errors import DatasetInvalid

ROLES = ("system", "user", "assistant", "tool")

_example_decoder = msgspec.json.Decoder(wire.Example)


@dataclass(frozen=True)
class Record:
    """One example and where it came from (for error messages)."""

    example: wire.Example
    source: str
    index: Optional[int] = None  # inline datasets, 0-based
    line: Optional[int] = None   # JSONL files, 1-based

    def where(self) -> str:
        return f"line {self.line} of {self.source}" if self.line is not None else f"{self.source}[{self.index}]"

    def invalid(self, problem: str, field: str) -> DatasetInvalid:
        return DatasetInvalid(f"{self.where()}: {problem}", source=self.source, index=self.index,
                              line=self.line, field=field)


@dataclass
class LoadedData:
    train: list[Record]
    validation: list[Record]
    metadata: Optional[dict[str, Any]] = None
    validation_metadata: Optional[dict[str, Any]] = None


def load_inline(dataset: wire.Dataset, source: str) -> list[Record]:
    return [Record(ex, source, index=i) for i, ex in enumerate(dataset.examples)]


def load_jsonl(path: str) -> list[Record]:
    """Read a JSONL file strictly: every non-blank line must be UTF-8 JSON decoding to ``wire.Example``."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DatasetInvalid(f"Dataset file {path} {what}", source=path, field="datasetPath")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DatasetInvalid(f"Dataset file {path} cannot be read: {exc.strerror}", source=path,
                             field="datasetPath") from None
    records: list[Record] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetInvalid(f"line {lineno} of {path}: not valid UTF-8 (byte {exc.start})",
                                 source=path, line=lineno, field="$") from None
        try:
            example = _example_decoder.decode(line)
        except msgspec.ValidationError as exc:
            text = str(exc)
            if " - at " not in text and "unknown field" not in text:
                # msgspec reports a wrong top-level type without a path.
                raise DatasetInvalid(f"line {lineno} of {path}: not a JSON object ({text})",
                                     source=path, line=lineno, field="$") from None
            field_ = _field_from_msgspec(text)
            raise DatasetInvalid(f"line {lineno} of {path}: {text}", source=path, line=lineno,
                                 field=field_) from None
        except msgspec.DecodeError as exc:
            raise DatasetInvalid(f"line {lineno} of {path}: not valid JSON ({exc})", source=path,
                                 line=lineno, field="$") from None
        records.append(Record(example, path, line=lineno))
    return records


def _field_from_msgspec(text: str) -> str:
    path = text.rsplit(" - at ", 1)[1].strip("`") if " - at " in text else "$"
    if "unknown field `" in text:
        path += "." + text.split("unknown field `", 1)[1].split("`", 1)[0]
    path = path.removeprefix("$").removeprefix(".")
    return path or "$"


def check_record(rec: Record, loss_on: str) -> None:
    """Structural checks that need no tokenizer. Raises DatasetInvalid naming the field."""
    ex = rec.example
    forms = [name for name, present in (("messages", ex.messages is not None),
                                        ("prompt/completion", ex.prompt is not None or ex.completion is not None),
                                        ("text", ex.text is not None)) if present]
    if len(forms) != 1:
        problem = ("has none of `messages`, `prompt`+`completion`, `text`" if not forms
                   else f"has more than one of {', '.join(forms)}; use exactly one form")
        raise rec.invalid(f"example {problem}", "$")
    if ex.messages is not None:
        if not ex.messages:
            raise rec.invalid("`messages` is empty", "messages")
        for j, m in enumerate(ex.messages):
            if m.role not in ROLES:
                raise rec.invalid(f"unknown role {m.role!r} in messages[{j}] (allowed: {', '.join(ROLES)})",
                                  f"messages[{j}].role")
            if m.content is None or not m.content.strip():
                raise rec.invalid(f"messages[{j}] ({m.role}) has {'no' if m.content is None else 'empty'} content",
                                  f"messages[{j}].content")
        if loss_on == "assistant" and not any(m.role == "assistant" for m in ex.messages):
            raise rec.invalid("no assistant turn, so nothing to train on (lossOn is \"assistant\")", "messages")
    elif ex.text is not None:
        if not ex.text.strip():
            raise rec.invalid("`text` is empty", "text")
    else:
        for name in ("prompt", "completion"):
            value = getattr(ex, name)
            if value is None or not value.strip():
                raise rec.invalid(f"`{name}` is {'missing' if value is None else 'empty'}", name)


def check_sources(params: wire.TrainParams) -> None:
    """Exactly one training source and at most one validation source (InvalidParams otherwise).

    Cheap and file-free: the door (training/checks.py) runs it when a ``train`` request arrives, before
    queuing it; ``load_train_and_validation`` trusts it has run."""
    wire.one_of(params, "dataset", "dataset_path",
                message="Give exactly one of `dataset` (inline) or `datasetPath` (JSONL file)")
    wire.one_of(params, "validation_dataset", "validation_path", "validation_split", at_most=True,
                message="Give at most one of {given}")


def load_train_and_validation(params: wire.TrainParams) -> LoadedData:
    """Read and structurally check the training and validation examples named by ``params``.

    ``params`` has passed ``check_sources`` at the door (training/checks.py ``check_request``; entry
    points without a server call it themselves): exactly one training source, at most one validation
    source."""
    assert (params.dataset is None) != (params.dataset_path is None), "check_sources runs at the door"
    if params.dataset is not None:
        train = load_inline(params.dataset, "dataset")
        metadata = params.dataset.metadata
    else:
        train = load_jsonl(params.dataset_path)
        metadata = None
    if not train:
        src = "dataset" if params.dataset is not None else params.dataset_path
        raise DatasetInvalid(f"{src}: the dataset has no examples", source=src, field="examples")
    for rec in train:
        check_record(rec, params.loss_on)

    validation: list[Record] = []
    val_metadata = None
    if params.validation_dataset is not None:
        validation = load_inline(params.validation_dataset, "validationDataset")
        val_metadata = params.validation_dataset.metadata
    elif params.validation_path is not None:
        validation = load_jsonl(params.validation_path)
    elif params.validation_split > 0:
        train, validation = split_records(train, params.validation_split, params.seed)
    if (params.validation_dataset is not None or params.validation_path is not None) and not validation:
        src = "validationDataset" if params.validation_dataset is not None else params.validation_path
        raise DatasetInvalid(f"{src}: the validation dataset has no examples", source=src, field="examples")
    for rec in validation:
        check_record(rec, params.loss_on)
    return LoadedData(train, validation, metadata, val_metadata)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded split; at least one example on each side, original order kept within each side."""
    if len(records) < 2:
        raise DatasetInvalid("validationSplit needs at least 2 examples in the dataset",
                             source=records[0].source if records else "dataset", field="validationSplit")
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])


def dataset_sha256(records: Sequence[Record]) -> str:
    """sha256 of the examples in canonical JSON (fixed field order, sorted metadata keys)."""
    h = hashlib.sha256()
    h.update(msgspec.json.encode([r.example for r in records], order="deterministic"))
    return h.hexdigest()
