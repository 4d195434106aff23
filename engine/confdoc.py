"""The config as documentation: every field of a ``fair run`` TOML file with its table, type,
default, allowed range and one-sentence description, read from the msgspec Structs of
``engine.config``.

One source for three readers: the generated reference page (``docs/hooks.py``), the comments of
``fair init``'s starter config (``engine.starter``), and the test that fails when a field has no
description (``tests/test_docs.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi

from fairdistill.engine import config as C

# set from the table key, never written by hand: left out of the reference and the starter
HIDDEN = {("endpoints.NAME", "name")}


@dataclass(frozen=True)
class FieldDoc:
    """One config field as a reader needs it."""

    table: str  # "" (top level), "run", "endpoints.NAME", "endpoints.NAME.batch", ...
    name: str
    type: str  # "integer", "float", "\"a\" | \"b\"", "list of strings", ...
    default: Any  # a TOML-able value; REQUIRED when the field must be given; None when unset
    range: str  # "1 ≤ x ≤ 1000000", "non-empty", "" when any value of the type goes
    description: str  # "" when the field has none (a test fails on that)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


REQUIRED = msgspec.NODEFAULT


@dataclass(frozen=True)
class TableDoc:
    """A TOML table (``[run]``, ``[endpoints.NAME]``): its description and its fields."""

    name: str
    description: str
    fields: list[FieldDoc]


def tables(kind: type[msgspec.Struct] = C.RunConfig) -> list[TableDoc]:
    """Every table of ``kind`` in file order: the top level first, then each section (an
    ``endpoints`` dict becomes ``endpoints.NAME``, its ``batch`` ``endpoints.NAME.batch``)."""
    info = mi.type_info(kind)
    assert isinstance(info, mi.StructType)
    out: list[TableDoc] = []
    _walk(info, "", "The top level of the file.", out)
    return out


def fields(kind: type[msgspec.Struct] = C.RunConfig) -> list[FieldDoc]:
    """Every field of every table of ``kind``, hidden ones included."""
    return [f for t in tables(kind) for f in t.fields]


def _walk(struct: mi.StructType, table: str, description: str, out: list[TableDoc]) -> None:
    here = TableDoc(table, description, [])
    out.append(here)
    for f in struct.fields:
        inner, text = _unwrap(f.type)
        path = f"{table}.{f.name}" if table else f.name
        inner = _optional(inner)[0] if isinstance(_optional(inner)[0], mi.StructType) else inner
        if isinstance(inner, mi.StructType):
            _walk(inner, path, text, out)
        elif isinstance(inner, mi.DictType) and isinstance(_unwrap(inner.value_type)[0], mi.StructType):
            _walk(_unwrap(inner.value_type)[0], f"{path}.NAME", text, out)  # type: ignore[arg-type]
        else:
            here.fields.append(
                FieldDoc(table, f.name, type_name(inner), _default(f), range_text(inner), text)
            )


def _unwrap(t: mi.Type) -> tuple[mi.Type, str]:
    """The type under its metadata, and the description the metadata carries."""
    text = ""
    while isinstance(t, mi.Metadata):
        text = (t.extra_json_schema or {}).get("description", text)
        t = t.type
    return t, text


def _default(f: mi.Field) -> Any:
    if f.required:
        return REQUIRED
    if f.default_factory is not msgspec.NODEFAULT:
        value = f.default_factory()
        return msgspec.to_builtins(value) if isinstance(value, msgspec.Struct) else value
    return f.default


def _optional(t: mi.Type) -> tuple[mi.Type, bool]:
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(rest) == 1 and len(rest) < len(t.types):
            return _unwrap(rest[0])[0], True
    return t, False


def type_name(t: mi.Type) -> str:
    """A reader's name for a config type: ``integer``, ``"a" | "b"``, ``list of strings``."""
    t, optional = _optional(t)
    names = {mi.IntType: "integer", mi.FloatType: "number", mi.StrType: "string", mi.BoolType: "boolean"}
    if isinstance(t, mi.LiteralType):
        name = " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in t.values)
    elif isinstance(t, mi.ListType):
        name = f"list of {type_name(_unwrap(t.item_type)[0])}s"
    elif isinstance(t, mi.DictType):
        name = f"table of {type_name(_unwrap(t.value_type)[0])}s"
    elif isinstance(t, mi.UnionType):
        name = " or ".join(type_name(_unwrap(x)[0]) for x in t.types)
    else:
        name = names.get(type(t), type(t).__name__.removesuffix("Type").lower())
    return f"{name} (optional)" if optional else name


def range_text(t: mi.Type) -> str:
    """The constraint msgspec enforces, in words: ``1 ≤ x ≤ 1000000``, ``> 0``, ``non-empty``."""
    t, _ = _optional(t)
    if isinstance(t, mi.IntType | mi.FloatType):
        low = f"{_num(t.ge)} ≤ " if t.ge is not None else f"{_num(t.gt)} < " if t.gt is not None else ""
        high = f" ≤ {_num(t.le)}" if t.le is not None else f" < {_num(t.lt)}" if t.lt is not None else ""
        return f"{low}x{high}" if low or high else ""
    if isinstance(t, mi.StrType):
        if t.pattern is not None:
            return C._PATTERN_WORDS.get(t.pattern, f"matches {t.pattern}")
        return "non-empty" if t.min_length else ""
    if isinstance(t, mi.DictType):
        key, value = _unwrap(t.key_type)[0], _unwrap(t.value_type)[0]
        parts = [range_text(key), range_text(value)]
        return "; ".join(f"{w}: {p}" for w, p in zip(("keys", "values"), parts, strict=True) if p)
    return ""


def _num(x: float) -> str:
    """``1000000`` as ``1,000,000``; 2**63 - 1 as ``2^63 - 1``; floats without a trailing ``.0``."""
    if isinstance(x, int) and abs(x) >= 2**62:
        return ("-" if x < 0 else "") + ("2^63" if abs(x) == 2**63 else "2^63 - 1")
    if isinstance(x, float) and x.is_integer() and not math.isinf(x):
        x = int(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def toml_value(value: Any) -> str:
    """A default as it would be written in TOML (``REQUIRED``/``None``: a placeholder)."""
    if value is REQUIRED:
        return "(required)"
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()  # a TOML basic string is JSON's escaping
    return _num(value) if isinstance(value, int) and abs(value) >= 2**62 else repr(value)
