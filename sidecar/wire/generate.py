"""The ``generate`` method: conversations answered by the base model under sets of adapters."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from msgspec import Meta

from .base import AdapterId, ModelName, PathText, Wire, placed
from .train import Message

Scale = Annotated[float, Meta(ge=-10, le=10)]


class AdapterRef(Wire, kw_only=True):
    """One adapter of a set: a resident one by ``id``, or an adapter directory by ``path`` (made resident
    under the budget if it is not yet), applied with ``scale`` (its update is scale · α/r · B·A)."""

    id: Optional[AdapterId] = None
    path: Optional[PathText] = None
    scale: Scale = 1.0


class Prompt(Wire, kw_only=True):
    """One conversation of an exam; ``id`` is echoed in its answers."""

    id: Optional[str] = None
    messages: Annotated[list[Message], Meta(min_length=1)]


class Variant(Wire, kw_only=True):
    """One adapter set of an exam (empty: the bare base model); ``id`` is echoed in its answers."""

    id: Optional[str] = None
    adapters: Annotated[list[AdapterRef], Meta(max_length=32)] = []


class _GenerateInput(Wire, kw_only=True):
    """The fields of ``GenerateParams`` before its ``Placement``: what to answer, with which adapters."""

    base_model: ModelName = "default"
    adapter_path: Optional[PathText] = None
    """Legacy: an adapter directory read from disk and applied for this call only (not made resident)."""
    messages: Optional[Annotated[list[Message], Meta(min_length=1)]] = None
    prompts: Optional[Annotated[list[Prompt], Meta(min_length=1, max_length=1024)]] = None
    adapters: Optional[Annotated[list[AdapterRef], Meta(max_length=32)]] = None
    """Stacked adapters: W + Σ scaleᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ. Empty or absent: the bare base model."""
    variants: Optional[Annotated[list[Variant], Meta(min_length=1, max_length=64)]] = None
    max_new_tokens: Annotated[int, Meta(gt=0, le=4096)] = 128
    temperature: Annotated[float, Meta(ge=0)] = 0.0
    seed: int = 42


class GenerateParams(placed(_GenerateInput), kw_only=True):
    """One conversation (``messages``) or several (``prompts``), answered by one adapter set
    (``adapters``, or the legacy ``adapterPath``) or by several (``variants``): every prompt × variant."""

    logprobs: bool = False
    """Also return the log-probability of each generated token (checks an adapter elsewhere)."""
    batch_size: Annotated[int, Meta(gt=0, le=512)] = 32
    """Most rows (prompt × variant) generated in one batch."""


class Answer(Wire, kw_only=True):
    prompt: int
    """Index into ``prompts`` (0 for ``messages``)."""
    variant: int
    """Index into ``variants`` (0 for ``adapters`` / ``adapterPath`` / the bare base)."""
    prompt_id: Optional[str] = None
    variant_id: Optional[str] = None
    text: str
    tokens: int
    token_ids: list[int] = []
    logprobs: Optional[list[float]] = None
    finish_reason: Literal["stop", "length"]
    """``stop``: the model ended its turn; ``length``: ``maxNewTokens`` was reached."""


class GenerateResult(Wire, kw_only=True):
    """``answers`` holds every prompt × variant, prompt-major; the top-level ``text``, ``tokens``,
    ``tokenIds`` and ``logprobs`` repeat the first answer (the only one for a single conversation)."""

    text: str
    tokens: int
    base_model: str
    adapter_path: Optional[str] = None
    token_ids: list[int] = []
    logprobs: Optional[list[float]] = None
    answers: list[Answer] = []
    adapters: list[str] = []
    """Ids of the resident adapters this request used."""
    evicted: list[str] = []
    """Adapters evicted to make room for ``path`` references loaded by this request."""
