"""Chat rendering and labels: one checked example → token ids and labels aligned with them.

``tokenize(records, tokenizer, ...)`` renders each example with the tokenizer's chat template and
builds labels aligned with ``input_ids`` (the Hugging Face convention: the model shifts them). With
``loss_on="assistant"`` only assistant content and the end-of-turn token carry labels; elsewhere the
label is ``IGNORE``. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .datasets import Record, dataset_sha256

IGNORE = -100


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
