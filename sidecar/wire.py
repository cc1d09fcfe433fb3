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
    "queued", "loading", "preparing", "training", "evaluating", "saving", "completed", "failed", "cancelled"
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

class Distributed(Wire, kw_only=True):
    """Train with several processes (one per GPU, or CPU processes) started by torch's elastic launcher.

    ``batchSize`` is per process: a micro-step takes ``batchSize × processes`` examples (the global
    batch), an optimizer step ``batchSize × gradientAccumulation × processes``; each step's examples
    are those of a single-process job with ``batchSize × processes`` and are dealt out row by row.
    """

    processes: Annotated[int, Meta(ge=1, le=1024)]
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: every process holds the whole model (DistributedDataParallel); ``fsdp``: the model is
    sharded over the processes (FSDP2 ``fully_shard``), for models that do not fit one device."""
    backend: Optional[Literal["gloo", "nccl"]] = None
    """torch.distributed backend; default nccl on CUDA, gloo on CPU."""


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

    distributed: Optional[Distributed] = None
    """Run the job on a worker group of several processes (docs/SCALING.md); None: in the sidecar."""


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


# ---------------------------------------------------------------------------------------------
# cancel / status
# ---------------------------------------------------------------------------------------------

class CancelParams(Wire, kw_only=True):
    job_id: str


JobState = Literal["queued", "running", "completed", "failed", "cancelled"]


class CancelResult(Wire, kw_only=True):
    job_id: str
    state: Literal["cancelling", "cancelled", "completed", "failed", "unknown"]
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
