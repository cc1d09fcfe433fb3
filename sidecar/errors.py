"""One exception hierarchy for everything the sidecar reports to a client.

Each class carries its JSON-RPC ``CODE`` and a default ``MESSAGE``; ``data`` is a plain dict that
is sent as ``error.data``. Anything that is not a ``SidecarError`` becomes -32603 (internal error)
at the protocol boundary, with the traceback on stderr only.
"""

from __future__ import annotations

from typing import Any


def clip(value: Any, limit: int, *, with_length: bool = False) -> str:
    """``value`` as it may appear in an error message: a string cut to ``limit`` characters (``…``,
    then its full length when ``with_length``), anything else its type name. A client-sent key or
    path can be megabytes long; the message quoting it must not be."""
    text = value if isinstance(value, str) else type(value).__name__
    if len(text) <= limit:
        return text
    return text[:limit] + (f"… ({len(text)} characters)" if with_length else "…")


class SidecarError(Exception):
    CODE = -32603
    MESSAGE = "Internal error"

    def __init__(self, message: str | None = None, **data: Any) -> None:
        super().__init__(message or self.MESSAGE)
        self.message = message or self.MESSAGE
        self.data = {k: v for k, v in data.items() if v is not None}

    def to_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.CODE, "message": self.message}
        if self.data:
            err["data"] = self.data
        return err


# Standard JSON-RPC 2.0 codes.
class ParseError(SidecarError):
    CODE, MESSAGE = -32700, "Parse error"


class InvalidRequest(SidecarError):
    CODE, MESSAGE = -32600, "Invalid Request"


class MethodNotFound(SidecarError):
    CODE, MESSAGE = -32601, "Method not found"


class InvalidParams(SidecarError):
    CODE, MESSAGE = -32602, "Invalid params"


class InternalError(SidecarError):
    CODE, MESSAGE = -32603, "Internal error"


class RequestCancelled(SidecarError):
    """LSP's RequestCancelled: the job was cancelled (``data: {jobId, stepsCompleted}``)."""

    CODE, MESSAGE = -32800, "Request cancelled"


# Application codes, -32010 … -32049.
class DatasetInvalid(SidecarError):
    CODE, MESSAGE = -32010, "Dataset invalid"


class ModelNotFound(SidecarError):
    CODE, MESSAGE = -32011, "Model not found"


class ModelLoadFailed(SidecarError):
    CODE, MESSAGE = -32012, "Model failed to load"


class OutOfMemory(SidecarError):
    CODE, MESSAGE = -32013, "Out of memory"


class QueueFull(SidecarError):
    CODE, MESSAGE = -32014, "Job queue is full"


class ShuttingDown(SidecarError):
    CODE, MESSAGE = -32015, "Sidecar is shutting down"


class Unsupported(SidecarError):
    CODE, MESSAGE = -32016, "Unsupported"


class TrainingFailed(SidecarError):
    CODE, MESSAGE = -32017, "Training failed"


class AdapterNotFound(SidecarError):
    CODE, MESSAGE = -32018, "Adapter not found"


class OutputExists(SidecarError):
    CODE, MESSAGE = -32019, "Output path already exists"


class DuplicateJob(SidecarError):
    CODE, MESSAGE = -32020, "A job with this id is already queued or running"


class PathError(SidecarError):
    """The operating system refused a path the client gave (permission denied, name too long, not a
    directory, ...): ``data: {field, path, reason, errno}`` names the params field."""

    CODE, MESSAGE = -32040, "Path cannot be used"


class ExportRefused(SidecarError):
    """The adapter holds something the export format cannot represent; the message says what to do instead."""

    CODE, MESSAGE = -32030, "Adapter cannot be exported to this format"


class ExportFailed(SidecarError):
    """Writing an export failed (nothing is left at the output path)."""

    CODE, MESSAGE = -32031, "Export failed"


# The adapter genome (resident adapters, stacking, composition): -32021 … -32029.
class AdapterBaseMismatch(SidecarError):
    """The adapter does not fit the base model (absent target modules, other shapes); ``data`` says what differs."""

    CODE, MESSAGE = -32021, "Adapter does not match the base model"


class AdapterIdInUse(SidecarError):
    CODE, MESSAGE = -32022, "Adapter id already in use"


class AdapterBudgetFull(SidecarError):
    """Loading would exceed the resident-adapter budget and nothing unpinned is left to evict."""

    CODE, MESSAGE = -32023, "Adapter memory budget full"


class AdapterUnsupported(SidecarError):
    """A valid PEFT adapter of a kind that cannot be resident or stacked (DoRA, lora_bias, embeddings, …)."""

    CODE, MESSAGE = -32024, "Adapter kind not supported here"


class AdapterInvalid(SidecarError):
    """The adapter directory is not a consistent LoRA adapter (missing or unreadable files, weights vs config)."""

    CODE, MESSAGE = -32025, "Adapter invalid"


class ComposeInvalid(SidecarError):
    """``adapters/compose`` cannot combine these sources with this method (rank or target mismatch, …)."""

    CODE, MESSAGE = -32026, "Composition not possible"


# Training continuity (-32035 … -32039).
class CheckpointNotFound(SidecarError):
    CODE, MESSAGE = -32035, "No checkpoint to resume from"


class ResumeMismatch(SidecarError):
    """``data.differs``: ``[{field, checkpoint, request}]`` — what the request would change."""

    CODE, MESSAGE = -32036, "The request differs from the job it resumes"


class CheckpointInvalid(SidecarError):
    CODE, MESSAGE = -32037, "Checkpoint is damaged or incompatible"


class AdapterMismatch(SidecarError):
    CODE, MESSAGE = -32038, "The adapter does not fit this base model"


class WorkerDied(SidecarError):
    """A process of a distributed job's worker group died (``data: {rank, pid, exitStatus, stderrTail}``)."""

    CODE, MESSAGE = -32045, "A distributed worker died"


class WorkerStartFailed(SidecarError):
    """The worker group of a distributed job did not start (``data: {rank?, stderrTail}``)."""

    CODE, MESSAGE = -32046, "The distributed worker group did not start"


class JobNotFound(SidecarError):
    """``pause`` / ``resume`` of a job id this process does not know (``data: {jobId}``)."""

    CODE, MESSAGE = -32050, "No such job"


class JobNotActive(SidecarError):
    """``pause`` / ``resume`` of a job that has ended, or ended before it reached its pause point
    (``data: {jobId, state}``)."""

    CODE, MESSAGE = -32051, "The job is no longer queued or running"


class BackgroundProcessDied(SidecarError):
    """The process of a background job ended without an answer (``data: {jobId, pid, exitStatus}``)."""

    CODE, MESSAGE = -32052, "The background job's process died"


class MemoryInsufficient(SidecarError):
    """The memory guard of ``train``: the job's estimated peak exceeds the memory it can get minus the
    margin (``data: {device, totalBytes, availableBytes, marginBytes, estimate, suggestions}``)."""

    CODE, MESSAGE = -32055, "Not enough memory for this job"


class ModelInUse(SidecarError):
    """``models/unload`` of a base a queued or running job or a resident adapter needs
    (``data: {baseModel, jobs, residents}``)."""

    CODE, MESSAGE = -32056, "The base model is in use"


ALL_ERRORS: list[type[SidecarError]] = [
    ParseError, InvalidRequest, MethodNotFound, InvalidParams, InternalError, RequestCancelled,
    DatasetInvalid, ModelNotFound, ModelLoadFailed, OutOfMemory, QueueFull, ShuttingDown,
    Unsupported, TrainingFailed, AdapterNotFound, OutputExists, DuplicateJob, PathError,
    ExportRefused, ExportFailed,
    AdapterBaseMismatch, AdapterIdInUse, AdapterBudgetFull, AdapterUnsupported, AdapterInvalid, ComposeInvalid,
    CheckpointNotFound, ResumeMismatch, CheckpointInvalid, AdapterMismatch,
    WorkerDied, WorkerStartFailed, JobNotFound, JobNotActive, BackgroundProcessDied,
    MemoryInsufficient, ModelInUse,
]
