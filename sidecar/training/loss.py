"""The loss of one batch, micro-batch splitting, and evaluation.

``loss_sum`` is the training objective: summed next-token cross-entropy over label tokens, computed
with the LM head only where labels are (selective logits) when the model allows it.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .. import data

# Computing the LM head only where labels exist is the default; LORA_SIDECAR_FULL_LOGITS=1 computes
# logits at every position instead (the stock Hugging Face path) so the lever can be measured.
FULL_LOGITS_ENV = "LORA_SIDECAR_FULL_LOGITS"
# Measurement switch: LORA_SIDECAR_ATTENTION_MASK=1 passes the attention mask even for right-padded batches.
ATTENTION_MASK_ENV = "LORA_SIDECAR_ATTENTION_MASK"

# Config attributes that change logits after the LM head; the selective path does not apply them.
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def supports_selective_logits(lm: Any) -> bool:
    """True when logits are ``lm_head(decoder(x).last_hidden_state)`` with nothing applied after."""
    if os.environ.get(FULL_LOGITS_ENV, "").strip() not in ("", "0"):
        return False
    prefix = getattr(lm, "base_model_prefix", "")
    if not prefix or not hasattr(lm, prefix) or lm.get_output_embeddings() is None:
        return False
    return all(getattr(lm.config, a, None) in (None, 1, 1.0) for a in _LOGIT_MODIFIERS)


def loss_sum(lm: Any, batch: data.Batch, *, selective: bool) -> Any:
    """Sum of next-token cross-entropy over every label (labels are aligned with input_ids).

    ``selective``: run the decoder only, then apply the LM head at the positions whose next token
    carries a label. With a 49k vocabulary the head dominates a small model's step, and most
    positions of a chat (system and user turns) have no label.
    """
    import torch.nn.functional as F

    shift_labels = batch.labels[:, 1:]
    # Rows are right-padded and attention is causal, so a real token never sees padding: the mask
    # changes nothing where labels are, and leaving it out lets SDPA take its causal kernel instead
    # of a masked one (measured: see docs/PERFORMANCE.md). Padding positions carry no label.
    keep_mask = not batch.right_padded or os.environ.get(ATTENTION_MASK_ENV, "").strip() not in ("", "0")
    mask = batch.attention_mask if keep_mask else None
    if selective:
        decoder = getattr(lm, lm.base_model_prefix)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        keep = shift_labels != data.IGNORE
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), shift_labels[keep], reduction="sum")
        return _with_correct(loss, logits, shift_labels[keep])
    logits = lm(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=data.IGNORE, reduction="sum")
    return _with_correct(loss, logits[:, :-1], shift_labels)


def _with_correct(loss: Any, logits: Any, labels: Any) -> Any:
    """``loss`` carrying ``correct``: how many label tokens the logits' argmax predicts (the step's
    ``tokenAccuracy``, from the logits already computed). Training only; a tensor, read once a step."""
    import torch

    if torch.is_grad_enabled():
        with torch.no_grad():
            loss.correct = (logits.argmax(-1) == labels).sum()  # IGNORE (-100) never equals a token id
    return loss


def split_by_tokens(indices: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Split one batch into micro-batches whose padded size (rows × longest row) fits ``budget``.

    The loss is summed over label tokens and divided by the step's total, so the split changes
    nothing in the update; it only bounds the activations held at once. A single example longer
    than the budget still runs whole. ``budget`` 0 means no split.
    """
    if budget <= 0 or len(indices) * max(lengths[i] for i in indices) <= budget:
        return [list(indices)]
    parts: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(indices, key=lengths.__getitem__):
        if current and max(longest, lengths[i]) * (len(current) + 1) > budget:
            parts.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    parts.append(current)
    return parts


def evaluate(lm: Any, items: list[data.Tokenized], *, batch_size: int, pad_id: int, device: str,
             selective: bool, should_stop: Callable[[], bool], on_stop: Callable[[], None]) -> float:
    """Token-weighted mean loss over ``items`` (dropout off, no gradients)."""
    import torch

    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    try:
        lengths = [len(t.input_ids) for t in items]
        order = sorted(range(len(items)), key=lengths.__getitem__)
        with torch.no_grad():
            for i in range(0, len(order), batch_size):
                if should_stop():
                    on_stop()
                batch = data.collate(items, order[i:i + batch_size], pad_id, device)
                total += loss_sum(lm, batch, selective=selective).item()
                count += batch.label_tokens
    finally:
        lm.train(was_training)
    return total / max(count, 1)

