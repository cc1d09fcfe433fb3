"""Every message on the wire, as msgspec Structs — the single source of the protocol.

Policy is set once on ``Wire``: camelCase names on the wire, unknown fields rejected, defaults
omitted from output. Constraints live in the types (``Annotated[int, Meta(gt=0)]``) so a bad value
is reported with its exact place (``Expected `int`, got `str` - at `$.rank```).
``lora-sidecar schema`` exports all of this as JSON Schema; docs/PROTOCOL.md and the TypeScript
client's types follow from it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import msgspec
from msgspec import Meta


class Wire(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Base of every wire type. Subclasses are declared ``kw_only=True`` (msgspec does not inherit
    it). Output always carries every field (``null`` where absent) so clients see a fixed shape."""


PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Fraction = Annotated[float, Meta(ge=0, lt=1)]

Phase = Literal[
    "queued", "loading", "preparing", "training", "evaluating", "saving", "completed", "failed", "cancelled",
    "interrupted",
]
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

class Message(Wire, kw_only=True):
    """One chat turn. ``role`` is checked by the dataset layer (DatasetInvalid names the example)."""

    role: str
    content: Optional[str] = None


class Example(Wire, kw_only=True):
    """One training example: ``messages`` (chat), or ``prompt`` + ``completion``, or ``text``."""

    messages: Optional[list[Message]] = None
    prompt: Optional[str] = None
    completion: Optional[str] = None
    text: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None


class Dataset(Wire, kw_only=True):
    examples: list[Example]
    metadata: Optional[dict[str, Any]] = None


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

class EarlyStopping(Wire, kw_only=True):
    patience: PositiveInt
    """Stop after this many evaluations in a row without improvement."""
    min_delta: Annotated[float, Meta(ge=0)] = 0.0
    """An evaluation improves when its validation loss is below the best by more than this."""


class CheckpointRef(Wire, kw_only=True):
    path: str
    step: int
    bytes: int


class TrainParams(Wire, kw_only=True):
    """Parameters of ``train``: a superset of the TypeScript ``LoRATrainingRequest``.

    Defaults live here and only here; the frozen instance is passed down whole and saved in the
    adapter's manifest.
    """

    base_model: str = "default"
    dataset: Optional[Dataset] = None
    dataset_path: Optional[str] = None
    validation_dataset: Optional[Dataset] = None
    validation_path: Optional[str] = None
    validation_split: Annotated[float, Meta(ge=0, le=0.5)] = 0.0
    output_path: Optional[str] = None
    name: Optional[str] = None
    job_id: Optional[Annotated[str, Meta(min_length=1, max_length=128)]] = None

    rank: Annotated[int, Meta(gt=0, le=1024)] = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.05
    target_modules: Optional[list[str]] = None
    use_rslora: bool = False
    use_dora: bool = False

    epochs: Annotated[int, Meta(gt=0, le=1000)] = 3
    max_steps: Optional[PositiveInt] = None
    """Exact number of optimizer steps; overrides ``epochs`` and repeats the data as needed."""
    learning_rate: Annotated[float, Meta(gt=0, le=1)] = 2e-4
    batch_size: Annotated[int, Meta(gt=0, le=4096)] = 4
    gradient_accumulation: Annotated[int, Meta(gt=0, le=4096)] = 1
    max_seq_length: Annotated[int, Meta(ge=8, le=131072)] = 1024
    warmup_ratio: Annotated[float, Meta(ge=0, le=1)] = 0.03
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Meta(ge=0)] = 1.0
    seed: int = 42
    loss_on: Literal["assistant", "all"] = "assistant"
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    """Batch examples of similar length together (less padding); order inside an epoch stays seeded."""
    micro_batch_tokens: Optional[Annotated[int, Meta(ge=0)]] = None
    """Largest padded micro-batch (rows × longest row) run at once; a bigger batch is split and its
    gradients accumulated — the same update, with bounded activation memory. ``None``: 512 on CPU,
    no limit on GPU; 0: never split."""

    quantize: bool = False
    quantize_bits: Literal[4, 8] = 4
    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False

    persona_id: Optional[str] = None
    persona_name: Optional[str] = None
    trait_type: Optional[str] = None

    progress_interval: Annotated[float, Meta(ge=0)] = 0.25
    """Minimum seconds between two progress notifications (phase changes are always sent)."""

    checkpoint_every: Optional[NonNegInt] = None
    """Write a checkpoint every N optimizer steps (0: not by steps)."""
    checkpoint_seconds: Optional[Annotated[float, Meta(ge=0)]] = None
    """Write a checkpoint when this many seconds of training passed since the last one (0: not by
    time). Neither field given: every 600 s (``LORA_SIDECAR_CHECKPOINT_SECONDS``), so a shorter job
    writes none; both 0: never, not even on cancel."""
    keep_checkpoints: Annotated[int, Meta(gt=0, le=1000)] = 2
    """Checkpoints kept per job (the newest; early stopping also keeps the best)."""
    resume_from: Optional[Annotated[str, Meta(min_length=1)]] = None
    """A job id (its newest checkpoint, found through the journal) or a checkpoint directory: continue
    that job exactly. Omitted params are the job's own; ones that would change the result are refused."""
    init_from: Optional[Annotated[str, Meta(min_length=1)]] = None
    """An adapter directory to start from (same base model; its rank, alpha and targets are used),
    with a fresh optimizer."""
    early_stopping: Optional[EarlyStopping] = None
    """Needs validation data: stop when the validation loss has not improved for ``patience``
    evaluations, and write the best adapter seen."""
    eval_every: Optional[PositiveInt] = None
    """Also evaluate every N optimizer steps (default: at epoch ends, at most about 10 times, and at the end)."""


class TrainMetrics(Wire, kw_only=True):
    train_loss: float
    """Mean training loss over the whole run (token-weighted)."""
    final_loss: float
    """Training loss of the last optimizer step."""
    validation_loss: Optional[float] = None
    epochs: float
    steps: int
    training_time: int
    """Milliseconds from the first step to the end of training."""
    examples_processed: int
    tokens_per_second: float
    """Tokens fed to the model per second of training (padding excluded)."""
    trainable_tokens: int
    truncated_examples: int
    time_to_first_step_ms: int
    """From the ``train`` request's arrival to the end of the first optimizer step."""
    load_time_ms: int
    model_cached: bool
    peak_memory_mb: float
    resumed_from_step: Optional[int] = None
    """Set when the job continued from a checkpoint. Losses, steps, examples, ``tokensPerSecond`` and
    ``trainingTime`` cover the whole run; ``timeToFirstStepMs``, ``loadTimeMs``, ``modelCached`` and
    ``peakMemoryMb`` describe the resumed process."""
    best_step: Optional[int] = None
    """With early stopping: the step whose adapter was written (its validation loss is ``validationLoss``)."""
    stopped_early: bool = False


class TrainResult(Wire, kw_only=True):
    job_id: str
    status: Literal["completed"] = "completed"
    adapter_path: str
    manifest_path: str
    metrics: TrainMetrics
    warnings: list[str] = []


class Progress(Wire, kw_only=True):
    """Params of the ``progress`` notification."""

    job_id: str
    phase: Phase
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None
    elapsed_seconds: float = 0.0
    eta_seconds: Optional[float] = None
    validation_loss: Optional[float] = None
    message: Optional[str] = None
    checkpoint: Optional[CheckpointRef] = None
    """Set on the notification sent when a checkpoint has been written."""


# ---------------------------------------------------------------------------------------------
# cancel / status
# ---------------------------------------------------------------------------------------------

class CancelParams(Wire, kw_only=True):
    job_id: str


JobState = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
"""``interrupted``: stopped by the process ending (crash, kill, shutdown, signal), not by ``cancel``;
resumable with ``train {resumeFrom: jobId}``."""


class CancelResult(Wire, kw_only=True):
    job_id: str
    state: Literal["cancelling", "cancelled", "completed", "failed", "interrupted", "unknown"]
    """``cancelling``: running, stops within one step; ``cancelled``: was queued (dropped) or already
    cancelled; ``completed``/``failed``: had already finished; ``unknown``: no such job."""


class JobInfo(Wire, kw_only=True):
    job_id: str
    kind: Literal["train", "generate"] = "train"
    state: JobState
    phase: Optional[Phase] = None
    base_model: str
    step: int = 0
    total_steps: int = 0
    submitted_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    error: Optional[str] = None
    adapter_path: Optional[str] = None
    last_checkpoint: Optional[CheckpointRef] = None


class StatusParams(Wire, kw_only=True):
    pass


class StatusResult(Wire, kw_only=True):
    running: Optional[JobInfo] = None
    queued: list[JobInfo] = []
    recent: list[JobInfo] = []
    loaded_models: list[str] = []


# ---------------------------------------------------------------------------------------------
# supports
# ---------------------------------------------------------------------------------------------

class SupportsParams(Wire, kw_only=True):
    base_model: Optional[str] = None


class DeviceInfo(Wire, kw_only=True):
    type: Literal["cpu", "cuda", "mps"]
    name: str
    memory_bytes: Optional[int] = None
    bf16: bool = False


class Quantization(Wire, kw_only=True):
    four_bit: bool
    eight_bit: bool
    reason: Optional[str] = None


class Limits(Wire, kw_only=True):
    max_rank: int
    max_queue: int
    max_message_bytes: int
    max_seq_length: int


class Defaults(Wire, kw_only=True):
    base_model: str
    rank: int
    alpha: float
    dropout: float
    epochs: int
    learning_rate: float
    batch_size: int
    max_seq_length: int
    scheduler: str


class ModelCheck(Wire, kw_only=True):
    name: str
    resolvable: bool
    kind: Optional[str] = None
    """``embedded`` (or ``embedded (not converted yet)``), ``directory``, ``gguf``, ``hub-cache`` or ``hub``."""
    path: Optional[str] = None
    loaded: bool = False
    error: Optional[str] = None


class SupportsResult(Wire, kw_only=True):
    protocol_version: str
    sidecar_version: str
    libraries: dict[str, str]
    devices: list[DeviceInfo]
    default_device: str
    default_dtype: str
    supports_fine_tuning: bool
    reason: Optional[str] = None
    quantization: Quantization
    methods: list[str]
    limits: Limits
    defaults: Defaults
    loaded_models: list[str] = []
    busy: bool = False
    queue_length: int = 0
    model: Optional[ModelCheck] = None


# ---------------------------------------------------------------------------------------------
# generate / shutdown
# ---------------------------------------------------------------------------------------------

class GenerateParams(Wire, kw_only=True):
    base_model: str = "default"
    adapter_path: Optional[str] = None
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_new_tokens: Annotated[int, Meta(gt=0, le=4096)] = 128
    temperature: Annotated[float, Meta(ge=0)] = 0.0
    seed: int = 42
    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False
    logprobs: bool = False
    """Also return the log-probability of each generated token (checks an adapter elsewhere)."""


class GenerateResult(Wire, kw_only=True):
    text: str
    tokens: int
    base_model: str
    adapter_path: Optional[str] = None
    token_ids: list[int] = []
    logprobs: Optional[list[float]] = None


class ShutdownParams(Wire, kw_only=True):
    pass


class ShutdownResult(Wire, kw_only=True):
    ok: bool = True
    cancelled_jobs: list[str] = []


# ---------------------------------------------------------------------------------------------
# errors and envelopes (documentation and JSON Schema only; the server builds these as dicts)
# ---------------------------------------------------------------------------------------------

class ErrorObject(msgspec.Struct, kw_only=True, omit_defaults=True):
    code: int
    message: str
    data: Optional[dict[str, Any]] = None


METHODS: dict[str, tuple[type, type]] = {
    "supports": (SupportsParams, SupportsResult),
    "train": (TrainParams, TrainResult),
    "cancel": (CancelParams, CancelResult),
    "status": (StatusParams, StatusResult),
    "generate": (GenerateParams, GenerateResult),
    "shutdown": (ShutdownParams, ShutdownResult),
}
"""Request methods: name → (params type, result type)."""

NOTIFICATIONS_OUT: dict[str, type] = {"progress": Progress}
"""Notifications the sidecar sends."""

NOTIFICATIONS_IN: tuple[str, ...] = ("exit", "$/cancelRequest")
"""Notifications the sidecar accepts."""


def decode_params(params: Any, kind: type) -> Any:
    """Convert decoded JSON params into ``kind``; raise InvalidParams naming the field."""
    from .errors import InvalidParams

    if params is None:
        params = {}
    if isinstance(params, list):
        raise InvalidParams("Params must be an object (by-name), not an array", expected="object")
    try:
        return msgspec.convert(params, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = text.rsplit(" - at ", 1)[1].strip("`") if " - at " in text else "$"
        if "unknown field `" in text:
            path += "." + text.split("unknown field `", 1)[1].split("`", 1)[0]
        raise InvalidParams(f"Invalid params: {text}", detail=text, field=path) from None


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every params, result and notification type, with a method index."""
    types = [p for pair in METHODS.values() for p in pair] + list(NOTIFICATIONS_OUT.values()) + [ErrorObject]
    _, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lora-sidecar JSON-RPC protocol",
        "methods": {name: {"params": p.__name__, "result": r.__name__} for name, (p, r) in METHODS.items()},
        "notifications": {name: t.__name__ for name, t in NOTIFICATIONS_OUT.items()},
        "$defs": components,
    }
