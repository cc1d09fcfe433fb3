"""Every message on the wire, as msgspec Structs — the single source of the protocol.

Policy is set once on ``Wire`` (base.py): camelCase names on the wire, unknown fields rejected,
frozen instances. Constraints live in the types (``Annotated[int, Meta(gt=0)]``) so a bad value
is reported with its exact place (``Expected `int`, got `str` - at `$.rank```).
``lora-sidecar schema`` exports all of this as JSON Schema; docs/PROTOCOL.md and the TypeScript
client's types follow from it.

The Structs live by domain (train.py, generate.py, adapters.py, system.py), the request door in
decode.py; this module holds the method table and re-exports every name, so ``wire.X`` is the way
in for every caller.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .adapters import (AdapterInfo, AdaptersComposeParams, AdaptersComposeResult, AdaptersListParams,
                       AdaptersListResult, AdaptersLoadParams, AdaptersLoadResult, AdaptersUnloadParams,
                       AdaptersUnloadResult, ComposeMethod, ComposeParent, ComposeSource, ExportedFile, ExportFormat,
                       ExportParams, ExportResult, OutType)
from .base import (MAX_COMPONENT_BYTES, MAX_JOB_ID, MAX_PATH_BYTES, TMP_SUFFIX_BYTES, AdapterId, Device, DType,
                   Fraction, JobId, ModelName, Name, NonNegInt, OutputPath, PathText, Placement, PositiveFloat,
                   PositiveInt, RequestId, Wire, one_of, placed)
from .decode import decode_params, decoder, path_fields
from .generate import AdapterRef, Answer, GenerateParams, GenerateResult, Prompt, Scale, Variant
from .system import (CancelParams, CancelRequestParams, CancelResult, Defaults, DeviceInfo, ErrorObject, ExitParams,
                     JobInfo, JobState, Limits, ModelCheck, ModelsUnloadParams, ModelsUnloadResult, Quantization,
                     ShutdownParams, ShutdownResult, StatusParams, StatusResult, SupportsParams, SupportsResult,
                     WarmModel, train_defaults)
from .train import (CheckpointRef, Dataset, Distributed, EarlyStopping, EstimateResult, Example, MemoryNow, Message,
                    PauseParams, PauseResult, Phase, Priority, Progress, ResumeParams, ResumeResult, TrainExport,
                    TrainMetrics, TrainParams, TrainResult, YieldPolicy)

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
    "pause": (PauseParams, PauseResult),
    "resume": (ResumeParams, ResumeResult),
    "estimate": (TrainParams, EstimateResult),
    "models/unload": (ModelsUnloadParams, ModelsUnloadResult),
}
"""Request methods: name → (params type, result type). The one list of method names."""

NOTIFICATIONS_OUT: dict[str, type] = {"progress": Progress}
"""Notifications the sidecar sends."""

NOTIFICATIONS_IN: dict[str, type] = {"exit": ExitParams, "$/cancelRequest": CancelRequestParams}
"""Notifications the sidecar accepts: name → params type."""


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
