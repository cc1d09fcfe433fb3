"""The ``train`` method and what it carries: datasets, the job's params and result, and the
``progress`` notification a job sends while it runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import msgspec
from msgspec import Meta

from .adapters import ExportFormat, ExportResult, OutType
from .base import (Fraction, JobId, ModelName, Name, NonNegInt, OutputPath, PathText, PositiveFloat, PositiveInt,
                   Wire, placed)

Phase = Literal[
    "queued", "loading", "preparing", "training", "evaluating", "saving", "completed", "failed", "cancelled",
    "interrupted", "paused",
]
Priority = Literal["normal", "background"]


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


class YieldPolicy(Wire, kw_only=True):
    """``train {yield}``: pause the job on its own while the rest of the machine keeps every core busy
    (training/yielding.py; the rule and its numbers are in docs/PROTOCOL.md)."""

    when_busy: bool = True
    busy_fraction: Annotated[float, Meta(ge=0.5, le=1.0)] = 0.9
    """Busy: the other processes use at least this share of every core. Idle (resume): at least this
    share of one core is unused."""
    window_seconds: Annotated[float, Meta(ge=0.1, le=60)] = 0.5
    """The machine must be busy this long (every sample) before the job pauses."""
    hold_seconds: Annotated[float, Meta(ge=0.1, le=600)] = 1.0
    """A core must be idle this long (every sample) before the job resumes."""


class TrainExport(Wire, kw_only=True):
    """One export a ``train`` job ends with (as ``adapters/export`` of the new adapter)."""

    format: ExportFormat
    out_type: Optional[OutType] = None
    output_path: Optional[PathText] = None
    """Default: under ``<adapter>/exports/``."""


class _TrainSetup(Wire, kw_only=True):
    """The fields of ``TrainParams`` before its ``Placement``: data, the LoRA, the optimisation, quantization."""

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


class TrainParams(placed(_TrainSetup), kw_only=True):
    """Parameters of ``train``: a superset of the TypeScript ``LoRATrainingRequest``.

    Defaults live here and only here; the frozen instance is passed down whole and saved in the
    adapter's manifest.
    """

    persona_id: Optional[str] = None
    persona_name: Optional[str] = None
    trait_type: Optional[str] = None

    progress_interval: Annotated[float, Meta(ge=0)] = 0.25
    """Minimum seconds between two progress notifications (phase changes are always sent)."""

    tensorboard: bool = True
    """Write the job's step and validation scalars as TensorBoard event files into the adapter
    directory (``runs/<jobId>/``), so ``tensorboard --logdir <adapters dir>`` compares jobs."""
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
    priority: Optional[Priority] = None
    """``background``: the job runs in a process of its own at the lowest CPU and I/O priority the OS
    gives without privileges (Linux SCHED_IDLE + idle I/O class, macOS PRIO_DARWIN_BG, elsewhere nice
    19), its threads waiting passively; ``normal``: in the sidecar, all cores. Default:
    ``LORA_SIDECAR_PRIORITY``, else ``normal`` (filled in at the door: status, progress and the
    manifest show the value used)."""
    threads: Optional[Annotated[int, Meta(ge=1, le=1024)]] = None
    """At most this many compute threads for the job (default: one per core)."""
    yield_: Optional[YieldPolicy] = msgspec.field(default=None, name="yield")
    """Pause by itself while the machine is busy, resume when a core is idle (see YieldPolicy)."""


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
    exports: list[ExportResult] = []
    """With ``export``: one result per export that was written, in request order."""


class MemoryNow(Wire, kw_only=True):
    """Memory of the process a job runs in, at one moment (MiB)."""

    rss_mb: Optional[float] = None
    """Resident set size of the job's process (null where the OS does not say)."""
    device_allocated_mb: Optional[float] = None
    """GPU: bytes the allocator holds for tensors now; null on CPU."""
    device_peak_mb: Optional[float] = None
    """GPU: the allocator's peak since the job started; null on CPU."""


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
    priority: Optional[Priority] = None
    threads: Optional[int] = None
    """The job's priority and compute-thread cap (null: one thread per core)."""
    paused_by: Optional[Literal["client", "busy"]] = None
    """With phase ``paused``: ``client`` (a ``pause`` request) or ``busy`` (``yield``)."""
    memory: Optional[MemoryNow] = None
    """The job process's memory as the notification is sent."""
    grad_norm: Optional[float] = None
    """The last optimizer step's gradient norm over the LoRA weights, before clipping."""
    token_accuracy: Optional[float] = None
    """The last optimizer step's next-token accuracy (argmax = label) over its trained tokens."""


# ---------------------------------------------------------------------------------------------
# pause / resume
# ---------------------------------------------------------------------------------------------

class PauseParams(Wire, kw_only=True):
    job_id: JobId
    release: bool = False
    """Also write a checkpoint (of the last whole step, when the job keeps checkpoints) and free what
    can be freed: the GPU allocator's cache, freed CPU memory returned to the OS."""


class PauseResult(Wire, kw_only=True):
    job_id: str
    state: Literal["paused", "running"]
    """``paused``: the job is parked (a queued job stays queued, held); ``running``: a ``resume``
    arrived before the job reached its pause point, so it never paused."""
    step: int = 0
    """Optimizer steps completed when it parked."""
    released: bool = False
    checkpoint: Optional[CheckpointRef] = None
    """With ``release``: the checkpoint written (null when the job keeps none)."""


class ResumeParams(Wire, kw_only=True):
    job_id: JobId


class ResumeResult(Wire, kw_only=True):
    job_id: str
    state: Literal["running", "queued", "paused"]
    """``paused``: ``yield`` still holds it (the machine is busy); it resumes when a core is idle."""
    step: int = 0


# ---------------------------------------------------------------------------------------------
# estimate
# ---------------------------------------------------------------------------------------------

class EstimateResult(Wire, kw_only=True):
    """What ``estimate`` (params: a ``train`` request) answers: the job's peak memory on its device,
    in bytes, from the model's config and the dataset's token lengths — nothing is loaded or trained."""

    device: str
    base_model: str
    base_bytes: int
    """Weights (+ bf16 copies of the frozen linears where the job takes bf16 matmuls)."""
    lora_bytes: int
    """LoRA weights and their gradients."""
    optimizer_bytes: int
    """AdamW's two moments per LoRA weight."""
    activation_bytes_peak: int
    """The largest micro-batch's saved activations, logits and backward buffers."""
    workspace_bytes: int
    """The runtime itself (CPU: the interpreter, torch and its libraries, the tokenizer; GPU: kernels' workspace)."""
    total_bytes: int
    """The job's peak: the sum above (CPU: the peak RSS of a process running this job alone)."""
    available_bytes: int
    """Memory the job can use: free memory now, plus what this process already holds that the job
    reuses (the warm base model)."""
    held_bytes: int = 0
    """Of ``totalBytes``, already held by the process the job runs in (a warm base, the runtime)."""
    margin_bytes: int = 0
    """``LORA_SIDECAR_MEMORY_MARGIN_MB``: kept free by the memory guard."""
    fits: bool
    """``totalBytes ≤ availableBytes − marginBytes``: what the guard at ``train`` checks."""
    peak_tokens: int = 0
    """Padded tokens of the largest micro-batch (rows × longest row)."""
    peak_label_tokens: int = 0
    suggestions: list[str] = []
    """With ``fits: false``: settings that would fit (smaller batch, microBatchTokens, gradient
    checkpointing, quantize), each checked with the same estimate."""
