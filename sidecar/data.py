"""Datasets: loading and validation, chat rendering with assistant-only labels, batching.

Three stages, each usable on its own:

1. ``load_train_and_validation(params)`` reads the examples (inline ``dataset`` or a JSONL
   ``datasetPath``; validation from ``validationDataset`` / ``validationPath`` / ``validationSplit``)
   and checks their structure. It needs no tokenizer, so a bad dataset is rejected before any model
   is loaded. Every problem is a ``DatasetInvalid`` whose data names ``source``, the example
   (``index``, 0-based, inline; ``line``, 1-based, JSONL) and the ``field``.
2. ``tokenize(records, tokenizer, ...)`` renders each example with the tokenizer's chat template and
   builds labels aligned with ``input_ids`` (the Hugging Face convention: the model shifts them).
   With ``loss_on="assistant"`` only assistant content and the end-of-turn token carry labels.
3. ``epoch_batches`` / ``collate`` group examples into right-padded micro-batches. Padding is
   identified by position (lengths → attention mask, labels -100), never by token id, because the
   pad token is often the end-of-turn token (SmolLM2: pad == eos == ``<|im_end|>``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import msgspec

from . import wire
from .errors import DatasetInvalid, InvalidParams

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100

_example_decoder = msgspec.json.Decoder(wire.Example)


# ---------------------------------------------------------------------------------------------
# 1. Loading and structural validation
# ---------------------------------------------------------------------------------------------

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

    Cheap and file-free: the server runs it when a ``train`` request arrives, before queuing it."""
    if (params.dataset is None) == (params.dataset_path is None):
        raise InvalidParams("Give exactly one of `dataset` (inline) or `datasetPath` (JSONL file)",
                            field="$.dataset" if params.dataset is None else "$.datasetPath")
    given = [n for n, v in (("validationDataset", params.validation_dataset),
                            ("validationPath", params.validation_path),
                            ("validationSplit", params.validation_split or None)) if v is not None]
    if len(given) > 1:
        raise InvalidParams(f"Give at most one of {', '.join(given)}", field=f"$.{given[1]}")


def load_train_and_validation(params: wire.TrainParams) -> LoadedData:
    """Read and structurally check the training and validation examples named by ``params``."""
    check_sources(params)

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


# ---------------------------------------------------------------------------------------------
# 2. Rendering and labels
# ---------------------------------------------------------------------------------------------

@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]          # aligned with input_ids; IGNORE where no loss
    truncated: bool

    @property
    def trainable(self) -> int:
        """Label tokens the loss actually sees (position 0 is never predicted)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class DatasetStats:
    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    sha256: str = ""
    metadata: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "tokens": self.tokens, "trainableTokens": self.trainable_tokens,
                "truncated": self.truncated, "sha256": self.sha256, "metadata": self.metadata}


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _end_of_turn_strings(tokenizer: Any) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    if tokenizer.eos_token:
        specials.add(tokenizer.eos_token)
    return sorted((s for s in specials if s), key=len, reverse=True)


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text with the character span of every assistant turn's
    trainable part: its content plus the end-of-turn token that follows it (``<|im_end|>`` for
    ChatML), excluding the role header before and any newline after.

    The span starts where the prefix rendered with a generation prompt ends (the template itself
    says where an assistant reply begins); templates that rewrite earlier turns fall back to
    finding the content in the rendered text.
    """
    text = render_chat(tokenizer, messages)
    eot_strings = _end_of_turn_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = end = -1
        if i > 0:
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            through = render_chat(tokenizer, messages[: i + 1])
            if through.startswith(before) and text.startswith(through) and len(before) >= cursor:
                start, end = len(before), len(through)
        lo, hi = (start, end) if start >= 0 else (cursor, len(text))
        # Templates may trim the content; look for it as given first.
        found, content = -1, m["content"]
        for candidate in (m["content"], m["content"].strip()):
            found = text.find(candidate, lo, hi)
            if found >= 0:
                content = candidate
                break
        if start < 0:
            if found < 0:
                raise ValueError(f"assistant turn {i} not found in the rendered chat template output")
            start, end = found, found + len(content)
        # Cut the span right after the content's end-of-turn token (drops the trailing "\n").
        content_end = found + len(content) if found >= 0 else end
        stop = content_end
        for s in eot_strings:
            if text.startswith(s, content_end):
                stop = content_end + len(s)
                break
        else:
            if found < 0:
                stop = start + len(text[start:end].rstrip())
        spans.append((start, stop))
        cursor = stop
    return text, spans


def encode_example(rec: Record, tokenizer: Any, *, loss_on: str, max_seq_length: int) -> Tokenized:
    """Tokenize one checked example; raise DatasetInvalid if no trainable token is left."""
    ex = rec.example
    if ex.text is not None:
        ids = list(tokenizer(ex.text, add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        labels = list(ids)
        field_ = "text"
    else:
        if ex.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in ex.messages]
        else:
            messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.completion}]
        field_ = "messages" if ex.messages is not None else "completion"
        try:
            text, spans = assistant_char_spans(tokenizer, messages)
        except Exception as exc:  # jinja TemplateError and friends: the template rejects this example
            raise rec.invalid(f"the chat template cannot render this example: {exc}", field_) from None
        # The rendered text already carries any BOS the template wants; never add another.
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(tokenizer.is_fast))
        ids = list(enc["input_ids"])
        if loss_on == "all":
            labels = list(ids)
        elif tokenizer.is_fast:
            labels = [IGNORE] * len(ids)
            for j, (a, b) in enumerate(enc["offset_mapping"]):
                if b > a and any(s <= a < e for s, e in spans):
                    labels[j] = ids[j]
        else:
            labels = [IGNORE] * len(ids)
            for s, e in spans:
                lo = len(tokenizer(text[:s], add_special_tokens=False)["input_ids"])
                hi = len(tokenizer(text[:e], add_special_tokens=False)["input_ids"])
                labels[lo:hi] = ids[lo:hi]
    truncated = len(ids) > max_seq_length
    if truncated:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    tok = Tokenized(ids, labels, truncated)
    if tok.trainable == 0:
        why = f" after truncation to maxSeqLength {max_seq_length}" if truncated else ""
        raise rec.invalid(f"no trainable token left{why}", field_)
    return tok


def tokenize(records: Sequence[Record], tokenizer: Any, *, loss_on: str, max_seq_length: int,
             metadata: Optional[dict[str, Any]] = None) -> tuple[list[Tokenized], DatasetStats]:
    items = [encode_example(r, tokenizer, loss_on=loss_on, max_seq_length=max_seq_length) for r in records]
    stats = DatasetStats(
        examples=len(items),
        tokens=sum(len(t.input_ids) for t in items),
        trainable_tokens=sum(t.trainable for t in items),
        truncated=sum(t.truncated for t in items),
        sha256=dataset_sha256(records),
        metadata=metadata,
    )
    return items, stats


# ---------------------------------------------------------------------------------------------
# 3. Batching
# ---------------------------------------------------------------------------------------------

def epoch_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Index batches covering every example exactly once, reproducible from (seed, epoch).

    ``group_by_length``: shuffle, cut into mega-batches of 50 batches, sort each by length and cut
    it into batches, then shuffle the batch order — similar lengths share a batch (little padding)
    while the order still varies from epoch to epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches: list[list[int]] = []
    for m in range(0, len(order), mega):
        chunk = sorted(order[m:m + mega], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


GROUPING_MIN_SAVING = 0.10
"""Length grouping is taken by default only when it saves at least this share of the fed tokens."""


def grouping_pays(lengths: Sequence[int], batch_size: int, *, seed: int) -> bool:
    """Whether grouping by length saves at least GROUPING_MIN_SAVING of the padded tokens an epoch of
    random batches would feed (epoch 0 of this seed; a pure function of the lengths and the seed).

    Measured on the benchmark (docs/PERFORMANCE.md): on mixed chats random batches of 4 feed 71 %
    more tokens than real ones and grouping is a ×1.25 lever; on short chats of nearly uniform length
    they feed 5 % more, and grouped batches (examples alike in length, and in templated data alike in
    content) scored 0.04–0.06 nat worse than random ones at equal tokens, over two seeds.
    """
    real = sum(lengths)
    if not real or batch_size <= 1:
        return False

    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    saved = padded(epoch_batches(lengths, batch_size, seed=seed, epoch=0, group_by_length=False)) - padded(
        epoch_batches(lengths, batch_size, seed=seed, epoch=0, group_by_length=True))
    return saved >= GROUPING_MIN_SAVING * real


@dataclass
class Batch:
    input_ids: Any        # LongTensor [B, T]
    attention_mask: Any   # LongTensor [B, T], 1 for real tokens
    labels: Any           # LongTensor [B, T], IGNORE on padding and masked tokens
    tokens: int           # real tokens (padding excluded)
    label_tokens: int     # labels the loss sees after the shift
    examples: int
    indices: list[int] = field(default_factory=list)
    right_padded: bool = True  # collate() pads after the real tokens, so causal attention never sees it


def collate(items: Sequence[Tokenized], indices: Sequence[int], pad_id: int, device: Any = "cpu") -> Batch:
    """Right-pad ``items[indices]``; the mask comes from lengths, not from comparing with ``pad_id``."""
    import torch

    rows = [items[i] for i in indices]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
        mask[b, :n] = 1
    return Batch(ids.to(device), mask.to(device), labels.to(device),
                 tokens=sum(len(r.input_ids) for r in rows),
                 label_tokens=sum(r.trainable for r in rows),
                 examples=len(rows), indices=list(indices))
