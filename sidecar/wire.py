"""Every message on the wire, as msgspec Structs — the single source of the protocol.

Policy is set once on ``Wire``: camelCase names on the wire, unknown fields rejected, defaults
omitted from output. Constraints live in the types (``Annotated[int, Meta(gt=0)]``) so a bad value
is reported with its exact place (``Expected `int`, got `str` - at `$.rank```).
``lora-sidecar schema`` exports all of this as JSON Schema; docs/PROTOCOL.md and the TypeScript
client's types follow from it.
"""

from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, Iterator, Literal, Optional, Union

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
# Names and paths: one constrained type each, reused by every method's params
# ---------------------------------------------------------------------------------------------
# Patterns are searched with Python's ``re``, where ``$`` also matches before a final newline;
# ``(?!\n)$`` closes that gap and means the same in JavaScript. Limits that a regex cannot state
# (bytes per path component) are checked by ``decode_params`` for every field whose Meta carries
# ``extra={"path": ...}``, so a new params Struct gets them by using these types.

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_JOB_ID = 64
TMP_SUFFIX_BYTES = len(".tmp-") + MAX_JOB_ID
"""An output directory is written as ``<name>.tmp-<jobId>`` first: room kept in its last component."""

_NO_CONTROL = r"^[^\x00-\x1f\x7f]*(?!\n)$"

PathText = Annotated[str, Meta(
    min_length=1, max_length=MAX_PATH_BYTES, pattern=_NO_CONTROL,
    description="A filesystem path: 1-4096 characters, no control characters (NUL, newline, ...), "
                "each component at most 255 bytes of UTF-8.",
    extra={"path": {"component_bytes": MAX_COMPONENT_BYTES}})]

OutputPath = Annotated[str, Meta(
    min_length=1, max_length=MAX_PATH_BYTES, pattern=_NO_CONTROL,
    description="A directory to create: a path (1-4096 characters, no control characters) whose last "
                f"component is at most {MAX_COMPONENT_BYTES - TMP_SUFFIX_BYTES} bytes of UTF-8 (room for the "
                "temporary name it is written under first).",
    extra={"path": {"component_bytes": MAX_COMPONENT_BYTES, "last_component_bytes":
                    MAX_COMPONENT_BYTES - TMP_SUFFIX_BYTES}})]

ModelName = Annotated[str, Meta(
    min_length=1, max_length=MAX_PATH_BYTES, pattern=_NO_CONTROL,
    description="A model: `default`, a directory, a .gguf file, or a Hugging Face id (org/name); "
                "1-4096 characters, no control characters.",
    extra={"path": {"component_bytes": MAX_COMPONENT_BYTES}})]

Name = Annotated[str, Meta(
    min_length=1, max_length=64, pattern=r"^(?!\.\.?(?!\n)$)[^\x00-\x1f\x7f/\\]+(?!\n)$",
    description="A name: 1-64 characters, no control characters, no `/` or `\\`, not `.` or `..`.")]

JobId = Annotated[str, Meta(
    min_length=1, max_length=MAX_JOB_ID, pattern=_NO_CONTROL,
    description="A job id: 1-64 characters, no control characters.")]

RequestId = Union[str, int, float]
"""A JSON-RPC request id as ``$/cancelRequest`` names it (null, objects and arrays are not ids)."""


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


class TrainExport(Wire, kw_only=True):
    """One export a ``train`` job ends with (as ``adapters/export`` of the new adapter)."""

    format: "ExportFormat"
    out_type: Optional["OutType"] = None
    output_path: Optional[PathText] = None
    """Default: under ``<adapter>/exports/``."""


class TrainParams(Wire, kw_only=True):
    """Parameters of ``train``: a superset of the TypeScript ``LoRATrainingRequest``.

    Defaults live here and only here; the frozen instance is passed down whole and saved in the
    adapter's manifest.
    """

    base_model: ModelName = "default"
    dataset: Optional[Dataset] = None
    dataset_path: Optional[PathText] = None
    validation_dataset: Optional[Dataset] = None
    validation_path: Optional[PathText] = None
    validation_split: Annotated[float, Meta(ge=0, le=0.5)] = 0.0
    output_path: Optional[OutputPath] = None
    name: Optional[Name] = None
    job_id: Optional[JobId] = None

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
    group_by_length: Optional[bool] = None
    """Batch examples of similar length together (less padding). ``None``: only where it pays, when
    random batches would feed at least 10 % more padded tokens than grouped ones (data.grouping_pays):
    grouping makes each batch's examples alike, which measurably cost adapter quality on data of
    near-uniform length, where it saves little. ``true`` / ``false``: always / never. The order inside
    an epoch stays seeded either way."""
    micro_batch_tokens: Optional[Annotated[int, Meta(ge=0)]] = None
    """Largest padded micro-batch (rows × longest row) run at once; a bigger batch is split and its
    gradients accumulated — the same update, with bounded activation memory. ``None``: 512 on CPU,
    no limit on GPU; 0: never split."""

    quantize: bool = False
    quantize_bits: Literal[4, 8] = 4
    device: Device = "auto"
    dtype: DType = "auto"
    """``auto``: bf16 on a CUDA GPU that supports it, else fp32 weights — and on a CPU with native bf16,
    bf16 matmuls over them in training (sidecar/training/bf16.py). ``float32``: every matmul in fp32."""
    trust_remote_code: bool = False

    persona_id: Optional[str] = None
    persona_name: Optional[str] = None
    trait_type: Optional[str] = None

    progress_interval: Annotated[float, Meta(ge=0)] = 0.25
    """Minimum seconds between two progress notifications (phase changes are always sent)."""

    load: bool = False
    """Also make the new adapter resident (as ``adapters/load`` would) and return its ``adapterId``."""
    export: Optional[Annotated[list[TrainExport], Meta(max_length=8)]] = None
    """Exports written once the adapter is saved (``gguf-lora``, ``merged``, ``merged-gguf``); each
    result is in ``TrainResult.exports``. An export that fails leaves the adapter in place and says why
    in ``warnings``."""
    checkpoint_every: Optional[NonNegInt] = None
    """Write a checkpoint every N optimizer steps (0: not by steps)."""
    checkpoint_seconds: Optional[Annotated[float, Meta(ge=0)]] = None
    """Write a checkpoint when this many seconds of training passed since the last one (0: not by
    time). Neither field given: every 600 s (``LORA_SIDECAR_CHECKPOINT_SECONDS``), so a shorter job
    writes none; both 0: never, not even on cancel."""
    keep_checkpoints: Annotated[int, Meta(gt=0, le=1000)] = 2
    """Checkpoints kept per job (the newest; early stopping also keeps the best)."""
    resume_from: Optional[PathText] = None
    """A job id (its newest checkpoint, found through the journal) or a checkpoint directory: continue
    that job exactly. Omitted params are the job's own; ones that would change the result are refused."""
    init_from: Optional[PathText] = None
    """An adapter directory to start from (same base model; its rank, alpha and targets are used),
    with a fresh optimizer."""
    early_stopping: Optional[EarlyStopping] = None
    """Needs validation data: stop when the validation loss has not improved for ``patience``
    evaluations, and write the best adapter seen."""
    eval_every: Optional[PositiveInt] = None
    """Also evaluate every N optimizer steps (default: at epoch ends, at most about 10 times, and at the end)."""
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
    adapter_id: Optional[str] = None
    """With ``load: true``: the id of the adapter, now resident (null if it could not be; see warnings)."""
    exports: list["ExportResult"] = []
    """With ``export``: one result per export that was written, in request order."""


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
    job_id: JobId


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
    kind: Literal["train", "generate", "export", "adapters/load", "adapters/unload", "adapters/compose"] = "train"
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
    adapters: Optional[AdaptersListResult] = None
    """Resident adapters and the budget, as ``adapters/list`` answers."""


# ---------------------------------------------------------------------------------------------
# supports
# ---------------------------------------------------------------------------------------------

class SupportsParams(Wire, kw_only=True):
    base_model: Optional[ModelName] = None


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
    max_nesting_depth: int
    """Deepest JSON nesting of one request object (the object itself is level 1)."""
    adapter_budget_bytes: Optional[int] = None
    """Bytes that resident adapters may occupy (``LORA_SIDECAR_ADAPTER_BUDGET_MB``)."""


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

AdapterId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._:@+/-]*$")]
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


class GenerateParams(Wire, kw_only=True):
    """One conversation (``messages``) or several (``prompts``), answered by one adapter set
    (``adapters``, or the legacy ``adapterPath``) or by several (``variants``): every prompt × variant."""

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
    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False
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


# ---------------------------------------------------------------------------------------------
# adapters/load, adapters/unload, adapters/list, adapters/compose (the genome)
# ---------------------------------------------------------------------------------------------

class AdaptersLoadParams(Wire, kw_only=True):
    """Make the PEFT LoRA adapter at ``path`` resident on its base model. Loading the same content
    again (same weights and config, same base) is a no-op that returns the same id."""

    path: PathText
    id: Optional[AdapterId] = None
    """Default: ``<directory name>-<first 8 hex of sha256>``."""
    pin: Optional[bool] = None
    """Pinned adapters are never evicted. Omitted: new adapters are unpinned, resident ones unchanged."""
    base_model: Optional[ModelName] = None
    """Default: ``base_model_name_or_path`` of the adapter's ``adapter_config.json``."""
    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False


class AdaptersLoadResult(Wire, kw_only=True):
    id: str
    path: str
    sha256: str
    """sha256 of ``adapter_model.safetensors``."""
    bytes: int
    """Bytes of the adapter's tensors on the device (what the budget counts)."""
    rank: int
    alpha: float
    use_rslora: bool = False
    target_modules: list[str]
    base_model: str
    device: str
    pinned: bool
    load_ms: int
    already_loaded: bool = False
    evicted: list[str] = []
    """Ids evicted (least recently used first) to make room."""


class AdaptersUnloadParams(Wire, kw_only=True):
    id: AdapterId


class AdaptersUnloadResult(Wire, kw_only=True):
    id: str
    bytes_freed: int
    used_bytes: int


class AdaptersListParams(Wire, kw_only=True):
    pass


class AdapterInfo(Wire, kw_only=True):
    id: str
    path: str
    sha256: str
    bytes: int
    device: str
    pinned: bool
    loaded_at: float
    """Unix seconds."""
    last_used_at: Optional[float] = None
    use_count: int = 0
    """Requests (generate, compose) that used it."""
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str] = []


class AdaptersListResult(Wire, kw_only=True):
    adapters: list[AdapterInfo] = []
    """Least recently used first (the eviction order, pinned ones aside)."""
    budget_bytes: int
    used_bytes: int


ComposeMethod = Literal["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                        "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


class ComposeSource(Wire, kw_only=True):
    id: Optional[AdapterId] = None
    path: Optional[PathText] = None
    weight: Annotated[float, Meta(ge=-10, le=10)]


class AdaptersComposeParams(Wire, kw_only=True):
    """Combine adapters into a new PEFT adapter directory with PEFT's ``add_weighted_adapter``."""

    sources: Annotated[list[ComposeSource], Meta(min_length=1, max_length=64)]
    method: ComposeMethod
    density: Optional[Annotated[float, Meta(gt=0, le=1)]] = None
    """Fraction of values kept: required by ties, dare_* and magnitude_prune (and their _svd forms)."""
    svd_rank: Optional[Annotated[int, Meta(gt=0, le=4096)]] = None
    """Rank of the result for the *_svd methods (default: the largest source rank)."""
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: int = 42
    """Seeds the random pruning of dare_*."""
    output_path: Optional[OutputPath] = None
    name: Optional[AdapterId] = None
    """Names the default output directory and, with ``load``, the resident id."""
    load: bool = False
    pin: Optional[bool] = None
    base_model: Optional[ModelName] = None
    """For ``path`` sources; default: the base named in their adapter_config.json."""
    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False


class ComposeParent(Wire, kw_only=True):
    id: Optional[str] = None
    path: str
    sha256: str
    weight: float
    rank: int
    alpha: float


class AdaptersComposeResult(Wire, kw_only=True):
    adapter_path: str
    manifest_path: str
    method: str
    density: Optional[float] = None
    rank: int
    target_modules: list[str]
    sha256: str
    bytes: int
    """Size of the written adapter_model.safetensors."""
    parents: list[ComposeParent]
    adapter_id: Optional[str] = None
    """With ``load: true``: the resident id of the result."""
    evicted: list[str] = []
    compose_ms: int


class ShutdownParams(Wire, kw_only=True):
    drain: Optional[bool] = None
    """``true``: let every job received before this request run to its end (its answer first), then
    answer; ``false``: cancel them (the default, ``true`` under ``lora-sidecar --drain``)."""


class ShutdownResult(Wire, kw_only=True):
    ok: bool = True
    cancelled_jobs: list[str] = []


class CancelRequestParams(Wire, kw_only=True):
    """Params of the ``$/cancelRequest`` notification (vscode-jsonrpc's CancellationToken)."""

    id: RequestId


class ExitParams(Wire, kw_only=True):
    """Params of the ``exit`` notification: none (any params are ignored)."""


# ---------------------------------------------------------------------------------------------
# adapters/export
# ---------------------------------------------------------------------------------------------

ExportFormat = Literal["gguf-lora", "merged", "merged-gguf"]
OutType = Literal["f32", "f16", "bf16", "q8_0"]


class ExportParams(Wire, kw_only=True):
    """Parameters of ``adapters/export``: exactly one of ``adapterPath`` and ``id``."""

    adapter_path: Optional[PathText] = None
    id: Optional[AdapterId] = None
    """A resident adapter's id (instead of ``adapterPath``)."""
    format: ExportFormat
    output_path: Optional[PathText] = None
    """A file (GGUF formats) or directory (``merged``); default: under ``<adapter>/exports/``. An
    existing directory given for a GGUF format receives the file under its default name."""
    out_type: Optional[OutType] = None
    """Tensor encoding. Default ``f16`` for the GGUF formats; for ``merged`` the base checkpoint's
    own dtype (``q8_0`` is GGUF only)."""
    overwrite: bool = False
    """Replace an existing export at the output path (atomically) instead of failing with -32019."""
    base_model: Optional[ModelName] = None
    """The adapter's base model, for adapters whose manifest / adapter_config does not resolve."""


class ExportedFile(Wire, kw_only=True):
    path: str
    bytes: int
    sha256: str


class ExportResult(Wire, kw_only=True):
    format: ExportFormat
    adapter_path: str
    output_path: str
    """The .gguf file, or the merged checkpoint's directory."""
    out_type: OutType
    sha256: str
    """Of the .gguf file, or of the merged checkpoint's weights (its largest file)."""
    bytes: int
    """Size of the output: the .gguf file, or every file of the merged checkpoint."""
    files: list[ExportedFile]
    """Every file written (with the Modelfile)."""
    modelfile_path: Optional[str] = None
    """Ollama Modelfile written beside a ``gguf-lora`` export whose base is a .gguf file."""
    base_model: str
    base_gguf: Optional[str] = None
    """The base model's .gguf file, when it is one (the file to load the LoRA with in llama.cpp)."""
    adapted_weights: int
    """Number of base weights the adapter changes (LoRA pairs written, or weights merged)."""
    lora_alpha: Optional[float] = None
    """``gguf-lora``: the ``adapter.lora.alpha`` written (llama.cpp scales by it / rank)."""
    manifest_updated: bool = False
    """Whether the export was recorded in the adapter's training_manifest.json (absent: not ours)."""
    duration_ms: int
    warnings: list[str] = []


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
    "adapters/export": (ExportParams, ExportResult),
    "shutdown": (ShutdownParams, ShutdownResult),
    "adapters/load": (AdaptersLoadParams, AdaptersLoadResult),
    "adapters/unload": (AdaptersUnloadParams, AdaptersUnloadResult),
    "adapters/list": (AdaptersListParams, AdaptersListResult),
    "adapters/compose": (AdaptersComposeParams, AdaptersComposeResult),
}
"""Request methods: name → (params type, result type)."""

NOTIFICATIONS_OUT: dict[str, type] = {"progress": Progress}
"""Notifications the sidecar sends."""

NOTIFICATIONS_IN: dict[str, type] = {"exit": ExitParams, "$/cancelRequest": CancelRequestParams}
"""Notifications the sidecar accepts: name → params type."""


def decode_params(params: Any, kind: type) -> Any:
    """Convert decoded JSON params into ``kind``; raise InvalidParams naming the field.

    Besides the constraints in the types, every path field (``PathText``, ``OutputPath``,
    ``ModelName``, also inside nested Structs and lists) is checked for its length in bytes and
    the length of each component, so the filesystem never sees a name it would refuse."""
    from .errors import InvalidParams

    if params is None:
        params = {}
    if isinstance(params, list):
        raise InvalidParams("Params must be an object (by-name), not an array", expected="object")
    try:
        value = msgspec.convert(params, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = text.rsplit(" - at ", 1)[1].strip("`") if " - at " in text else "$"
        if "unknown field `" in text:
            rest = text.split("unknown field `", 1)[1]
            name = rest.rsplit("` - at `", 1)[0] if " - at `" in rest else rest[:-1]
            if len(name) > 100:  # a huge key would make a huge message
                text = f"Object contains unknown field `{_clip(name)}` - at `{path}`"
            path += "." + _clip(name)
        elif "matching regex" in text:
            text = f"Invalid value - at `{path}`: {_description_at(kind, path) or text}"
        raise InvalidParams(f"Invalid params: {text}", detail=text, field=path) from None
    for field, text, rule in _path_values(value, "$"):
        _check_path(field, text, rule)
    return value


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _check_path(field: str, text: str, rule: dict[str, int]) -> None:
    from .errors import InvalidParams

    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate; JSON decoders refuse most, be sure anyway
        raise InvalidParams(f"Invalid params: `{field}` is not valid Unicode", field=field) from None
    if len(data) > MAX_PATH_BYTES:
        raise InvalidParams(f"Invalid params: `{field}` is {len(data)} bytes of UTF-8; the limit is "
                            f"{MAX_PATH_BYTES}", field=field, limit=MAX_PATH_BYTES)
    parts = data.split(b"/")
    for i, part in enumerate(parts):
        limit = rule.get("last_component_bytes", rule["component_bytes"]) if i == len(parts) - 1 \
            else rule["component_bytes"]
        if len(part) > limit:
            shown = part[:40].decode("utf-8", "replace")
            raise InvalidParams(
                f"Invalid params: `{field}` has a path component of {len(part)} bytes ({shown}…); "
                f"the limit is {limit}", field=field, limit=limit)


def _path_meta(tp: Any) -> Optional[dict[str, int]]:
    if typing.get_origin(tp) is Annotated:
        for meta in typing.get_args(tp)[1:]:
            if isinstance(meta, Meta) and meta.extra and "path" in meta.extra:
                return meta.extra["path"]
    return None


@functools.lru_cache(maxsize=None)
def _path_plan(cls: type) -> tuple[tuple[str, str, str, Any], ...]:
    """Fields of Struct ``cls`` that hold paths: (attribute, wire name, kind, rule or Struct type),
    kind being ``path``, ``paths``, ``struct`` or ``structs``. Cached per type."""
    plan = []
    for f in msgspec.structs.fields(cls):
        tp, many = f.type, False
        if typing.get_origin(tp) is Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                continue
            tp = args[0]
        if typing.get_origin(tp) is list:
            tp, many = typing.get_args(tp)[0], True
        rule = _path_meta(tp)
        if rule is not None:
            plan.append((f.name, f.encode_name, "paths" if many else "path", rule))
        elif isinstance(tp, type) and issubclass(tp, msgspec.Struct) and _path_plan(tp):
            plan.append((f.name, f.encode_name, "structs" if many else "struct", tp))
    return tuple(plan)


def path_fields(obj: Any) -> Iterator[tuple[str, str]]:
    """(JSON path, value) of every path field set in a params Struct (see ``PathText``)."""
    for at, value, _ in _path_values(obj, "$"):
        yield at, value


def _path_values(obj: Any, at: str) -> Iterator[tuple[str, str, dict[str, int]]]:
    if not isinstance(obj, msgspec.Struct):
        return
    for attr, wire_name, kind, rule in _path_plan(type(obj)):
        value = getattr(obj, attr)
        if value is None:
            continue
        field = f"{at}.{wire_name}"
        if kind == "path":
            yield field, value, rule
        elif kind == "paths":
            for i, item in enumerate(value):
                yield f"{field}[{i}]", item, rule
        elif kind == "struct":
            yield from _path_values(value, field)
        else:
            for i, item in enumerate(value):
                yield from _path_values(item, f"{field}[{i}]")


def _description_at(kind: type, path: str) -> Optional[str]:
    """The ``description`` of the constrained type at a top-level ``$.field`` of Struct ``kind``."""
    name = path[2:] if path.startswith("$.") else None
    if not name or not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
        return None
    for f in msgspec.structs.fields(kind):
        if f.encode_name == name:
            tp = f.type
            stack = [tp]
            while stack:
                tp = stack.pop()
                if typing.get_origin(tp) is Annotated:
                    for meta in typing.get_args(tp)[1:]:
                        if isinstance(meta, Meta) and meta.description:
                            return meta.description
                stack.extend(typing.get_args(tp))
    return None


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every params, result and notification type, with a method index."""
    types = ([p for pair in METHODS.values() for p in pair] + list(NOTIFICATIONS_OUT.values())
             + list(NOTIFICATIONS_IN.values()) + [ErrorObject])
    _, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lora-sidecar JSON-RPC protocol",
        "methods": {name: {"params": p.__name__, "result": r.__name__} for name, (p, r) in METHODS.items()},
        "notifications": {name: t.__name__ for name, t in NOTIFICATIONS_OUT.items()},
        "notificationsIn": {name: t.__name__ for name, t in NOTIFICATIONS_IN.items()},
        "$defs": components,
    }
