"""The methods about the sidecar itself and its jobs: ``supports``, ``status``, ``cancel``,
``shutdown``, the notifications it accepts, and the JSON-RPC error object."""

from __future__ import annotations

from typing import Any, Literal, Optional

import msgspec

from .adapters import AdaptersListResult
from .base import JobId, ModelName, RequestId, Wire
from .train import CheckpointRef, Phase, Priority, TrainParams

# ---------------------------------------------------------------------------------------------
# cancel / status
# ---------------------------------------------------------------------------------------------

class CancelParams(Wire, kw_only=True):
    job_id: JobId


JobState = Literal["queued", "running", "paused", "completed", "failed", "cancelled", "interrupted"]
"""``paused``: held by ``pause`` (or by ``yield``), in the queue or at a pause point of its run.
``interrupted``: stopped by the process ending (crash, kill, shutdown, signal), not by ``cancel``;
resumable with ``train {resumeFrom: jobId}``."""


class CancelResult(Wire, kw_only=True):
    job_id: str
    state: Literal["cancelling", "cancelled", "completed", "failed", "interrupted", "unknown"]
    """``cancelling``: running, stops within one step; ``cancelled``: was queued (dropped) or already
    cancelled; ``completed``/``failed``: had already finished; ``unknown``: no such job."""


class JobInfo(Wire, kw_only=True):
    job_id: str
    kind: Literal["train", "generate", "export", "adapters/load", "adapters/unload", "adapters/compose",
                  "models/unload"] = "train"
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
    priority: Optional[Priority] = None
    threads: Optional[int] = None
    paused_by: Optional[Literal["client", "busy"]] = None


class WarmModel(Wire, kw_only=True):
    """A base model kept warm in the sidecar's model cache, and the bytes it holds."""

    name: str
    path: str
    device: str
    dtype: str
    quantize_bits: Optional[int] = None
    """4 or 8 when loaded quantized (its ``weightsBytes`` are the quantized ones)."""
    weights_bytes: int
    """Parameters and buffers as loaded."""
    bf16_copy_bytes: int = 0
    """bf16 copies of the frozen linears kept for bf16 matmuls (training/bf16.py)."""
    total_bytes: int
    residents: list[str] = []
    """Ids of the resident adapters loaded on this base (their bytes: ``adapters``)."""
    held_by: Literal["sidecar", "background"] = "sidecar"
    """Whose cache keeps it: the sidecar's, or the background job process's (``priority: background``)."""


class StatusParams(Wire, kw_only=True):
    pass


class StatusResult(Wire, kw_only=True):
    running: Optional[JobInfo] = None
    queued: list[JobInfo] = []
    recent: list[JobInfo] = []
    loaded_models: list[str] = []
    adapters: Optional[AdaptersListResult] = None
    """Resident adapters and the budget, as ``adapters/list`` answers."""
    models: list[WarmModel] = []
    """The warm base models with their bytes, least recently used first."""


# ---------------------------------------------------------------------------------------------
# models/unload
# ---------------------------------------------------------------------------------------------

class ModelsUnloadParams(Wire, kw_only=True):
    base_model: ModelName
    """As ``train`` names it; every warm entry of that model (any device, dtype, quantization) goes."""
    force: bool = False
    """Also unload the resident adapters loaded on it (without: refused while there are any)."""


class ModelsUnloadResult(Wire, kw_only=True):
    base_model: str
    unloaded: list[WarmModel] = []
    """What was freed (empty: the model was not warm)."""
    bytes_freed: int = 0
    residents_unloaded: list[str] = []
    """With ``force``: the resident adapters unloaded with it."""


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
    export_architectures: list[str] = []
    """transformers model types ``adapters/export`` writes ``gguf-lora``/``merged-gguf`` for (``merged``
    works for any); their image-text checkpoints (Qwen3.5, Gemma 3) export their text model."""
    default_target_modules: dict[str, list[str]] = {}
    """transformers model type -> the ``targetModules`` a train request without them gets: every
    linear projection inside the transformer blocks (Qwen3.5: its linear-attention projections too).
    Other architectures get every linear layer found inside their decoder layers."""


def train_defaults() -> Defaults:
    """The ``TrainParams`` defaults that ``supports`` reports: each field of ``Defaults`` read from a
    default ``TrainParams``, so the two cannot drift apart."""
    params = TrainParams()
    return Defaults(**{name: getattr(params, name) for name in Defaults.__struct_fields__})


# ---------------------------------------------------------------------------------------------
# shutdown, notifications in, errors
# ---------------------------------------------------------------------------------------------

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


# The error object is documentation and JSON Schema only: the server builds errors as dicts.
class ErrorObject(msgspec.Struct, kw_only=True, omit_defaults=True):
    code: int
    message: str
    data: Optional[dict[str, Any]] = None
