"""The adapter methods (the genome): ``adapters/load``, ``adapters/unload``, ``adapters/list``,
``adapters/compose`` and ``adapters/export``."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from msgspec import Meta

from .base import AdapterId, ModelName, OutputPath, PathText, Wire, placed

# ---------------------------------------------------------------------------------------------
# adapters/load, adapters/unload, adapters/list, adapters/compose (the genome)
# ---------------------------------------------------------------------------------------------

class _AdapterToLoad(Wire, kw_only=True):
    """The fields of ``AdaptersLoadParams`` before its ``Placement``."""

    path: PathText
    id: Optional[AdapterId] = None
    """Default: ``<directory name>-<first 8 hex of sha256>``."""
    pin: Optional[bool] = None
    """Pinned adapters are never evicted. Omitted: new adapters are unpinned, resident ones unchanged."""
    base_model: Optional[ModelName] = None
    """Default: ``base_model_name_or_path`` of the adapter's ``adapter_config.json``."""


class AdaptersLoadParams(placed(_AdapterToLoad), kw_only=True):
    """Make the PEFT LoRA adapter at ``path`` resident on its base model. Loading the same content
    again (same weights and config, same base) is a no-op that returns the same id."""


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


class _Composition(Wire, kw_only=True):
    """The fields of ``AdaptersComposeParams`` before its ``Placement``."""

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


class AdaptersComposeParams(placed(_Composition), kw_only=True):
    """Combine adapters into a new PEFT adapter directory with PEFT's ``add_weighted_adapter``."""


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


# ---------------------------------------------------------------------------------------------
# adapters/export
# ---------------------------------------------------------------------------------------------

ExportFormat = Literal["gguf-lora", "merged", "merged-gguf"]
OutType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
"""``q4_0``, ``q4_k_m``, ``q5_k_m``, ``q6_k``: ``merged-gguf`` only, quantized by llama.cpp (llama-cpp-python)."""


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
    own dtype (``q8_0`` is GGUF only; ``q4_0``, ``q4_k_m``, ``q5_k_m``, ``q6_k`` are ``merged-gguf`` only
    and need llama-cpp-python, else -32030 reason ``no-quantizer``)."""
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
