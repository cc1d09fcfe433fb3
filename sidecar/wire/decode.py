"""Params in: ``decode_params`` turns a request's JSON params into its Struct, or InvalidParams naming
the field; then every path field is held to the byte limits a regex cannot state.

The server parses each request whole (its envelope is checked before the method is known), so params
arrive as Python objects and are converted with ``msgspec.convert``; msgspec keeps each Struct's
conversion plan on the type, so nothing is rebuilt per call. Bytes that are one wire type (a file, a
line of a socket) are read with ``decoder(kind)``: one JSON Decoder per type, built once.
"""

from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, Iterator, Optional, Union

import msgspec
from msgspec import Meta

from .. import errors
from .base import MAX_PATH_BYTES


@functools.lru_cache(maxsize=None)
def decoder(kind: type) -> msgspec.json.Decoder:
    """The JSON Decoder of ``kind``, built on first use and shared."""
    return msgspec.json.Decoder(kind)


def decode_params(params: Any, kind: type) -> Any:
    """Convert decoded JSON params into ``kind``; raise InvalidParams naming the field.

    Besides the constraints in the types, every path field (``PathText``, ``OutputPath``,
    ``ModelName``, also inside nested Structs and lists) is checked for its length in bytes and
    the length of each component, so the filesystem never sees a name it would refuse."""
    if params is None:
        params = {}
    if isinstance(params, list):
        raise errors.InvalidParams("Params must be an object (by-name), not an array", expected="object")
    try:
        value = msgspec.convert(params, kind)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc), kind) from None
    for field, text, rule in _path_values(value, "$"):
        _check_path(field, text, rule)
    return value


def _invalid(text: str, kind: type) -> errors.InvalidParams:
    """msgspec's message, with a huge unknown key clipped and a failed pattern explained by its type."""
    path = text.rsplit(" - at ", 1)[1].strip("`") if " - at " in text else "$"
    if "unknown field `" in text:
        rest = text.split("unknown field `", 1)[1]
        name = rest.rsplit("` - at `", 1)[0] if " - at `" in rest else rest[:-1]
        if len(name) > 100:  # a huge key would make a huge message
            text = f"Object contains unknown field `{errors.clip(name, 100, with_length=True)}` - at `{path}`"
        path += "." + errors.clip(name, 100, with_length=True)
    elif "matching regex" in text:
        text = f"Invalid value - at `{path}`: {_description_at(kind, path) or text}"
    return errors.InvalidParams(f"Invalid params: {text}", detail=text, field=path)


def _description_at(kind: type, path: str) -> Optional[str]:
    """The ``description`` of the constrained type at a top-level ``$.field`` of Struct ``kind``."""
    name = path[2:] if path.startswith("$.") else None
    if not name or not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
        return None
    for f in msgspec.structs.fields(kind):
        if f.encode_name == name:
            stack = [f.type]
            while stack:
                tp = stack.pop()
                if typing.get_origin(tp) is Annotated:
                    for meta in typing.get_args(tp)[1:]:
                        if isinstance(meta, Meta) and meta.description:
                            return meta.description
                stack.extend(typing.get_args(tp))
    return None


# ---------------------------------------------------------------------------------------------
# Path rules: the byte limits of path fields (see base.PathText)
# ---------------------------------------------------------------------------------------------

def _check_path(field: str, text: str, rule: dict[str, int]) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate; JSON decoders refuse most, be sure anyway
        raise errors.InvalidParams(f"Invalid params: `{field}` is not valid Unicode", field=field) from None
    if len(data) > MAX_PATH_BYTES:
        raise errors.InvalidParams(f"Invalid params: `{field}` is {len(data)} bytes of UTF-8; the limit is "
                                   f"{MAX_PATH_BYTES}", field=field, limit=MAX_PATH_BYTES)
    parts = data.split(b"/")
    for i, part in enumerate(parts):
        limit = rule.get("last_component_bytes", rule["component_bytes"]) if i == len(parts) - 1 \
            else rule["component_bytes"]
        if len(part) > limit:
            shown = part[:40].decode("utf-8", "replace")
            raise errors.InvalidParams(
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
