"""What every wire type stands on: the frozen ``Wire`` base, the constrained types (numbers, names,
paths), the ``Placement`` fields shared by the params that load a model, and ``one_of`` for the
"exactly one of" rules a type cannot state.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

import msgspec
from msgspec import Meta

from .. import errors


class Wire(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """Base of every wire type: camelCase names on the wire, unknown fields rejected, and frozen — an
    instance is never changed once built (``msgspec.structs.replace`` makes a changed copy), so one
    decoded request can be passed down whole. Subclasses are declared ``kw_only=True`` (msgspec does
    not inherit it). Output always carries every field (``null`` where absent) so clients see a fixed
    shape."""


PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Fraction = Annotated[float, Meta(ge=0, lt=1)]

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

AdapterId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._:@+/-]*$")]

RequestId = Union[str, int, float]
"""A JSON-RPC request id as ``$/cancelRequest`` names it (null, objects and arrays are not ids)."""


# ---------------------------------------------------------------------------------------------
# Placement: where and how a request's model is loaded
# ---------------------------------------------------------------------------------------------

class Placement(Wire, kw_only=True):
    """The fields of every params Struct that loads a model (``train``, ``generate``, ``adapters/load``,
    ``adapters/compose``), declared once here and added to each with ``placed``."""

    device: Device = "auto"
    dtype: DType = "auto"
    """``auto``: bf16 on a CUDA GPU that supports it, else fp32 weights — and on a CPU with native bf16,
    bf16 matmuls over them in training (sidecar/training/bf16.py). ``float32``: every matmul in fp32."""
    trust_remote_code: bool = False


W = TypeVar("W", bound=Wire)


def placed(head: type[W]) -> type[W]:
    """``head`` followed by the ``Placement`` fields, as the base of a params Struct (whose own fields
    come after them).

    Not plain inheritance from ``Placement``: msgspec puts inherited fields first, and field order is
    wire order (the JSON Schema, the TypeScript types, key order in params.json and manifests), which
    has these fields in the middle or at the end."""
    fields = [(f.name, f.type, f.default) for f in msgspec.structs.fields(Placement)]
    return msgspec.defstruct(f"{head.__name__}Placed", fields, bases=(head,), module=head.__module__,
                             kw_only=True)


# ---------------------------------------------------------------------------------------------
# one_of: alternatives a type cannot express
# ---------------------------------------------------------------------------------------------

_REQUIRED = object()


@functools.lru_cache(maxsize=None)
def _field_info(kind: type) -> dict[str, tuple[str, Any]]:
    """attribute -> (wire name, default; ``_REQUIRED`` for a field without one). Cached per type."""
    info = {}
    for f in msgspec.structs.fields(kind):
        default = f.default
        if default is msgspec.NODEFAULT:
            default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else _REQUIRED
        info[f.name] = (f.encode_name, default)
    return info


def one_of(obj: msgspec.Struct, *attrs: str, message: str, field: Optional[str] = None, at: str = "$",
           at_most: bool = False) -> list[str]:
    """Refuse ``obj`` (InvalidParams) unless exactly one of ``attrs`` is given — with ``at_most``,
    unless at most one is. Returns the wire names of those given, in the order of ``attrs``.

    A field is given when it differs from its default (so ``validationSplit: 0`` is no validation
    source). ``{given}`` in ``message`` becomes the wire names given; ``field`` defaults to
    ``<at>.<name>`` of the first of ``attrs`` when none is given, of the second one given when
    several are."""
    info = _field_info(type(obj))
    given = [info[a][0] for a in attrs if getattr(obj, a) != info[a][1]]
    if len(given) == 1 or (at_most and not given):
        return given
    if field is None:
        field = f"{at}.{given[1] if given else info[attrs[0]][0]}"
    raise errors.InvalidParams(message.replace("{given}", ", ".join(given)), field=field)
