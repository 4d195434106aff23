"""Check a JSON value against an official SDK's request ``TypedDict``, as strictly as the API.

The SDKs type their request bodies as TypedDicts (``openai``'s ``CompletionCreateParams``,
``anthropic``'s ``MessageCreateParams``) but never check a dict against them. ``problems(value, T)``
does, over the annotations ``typing.get_type_hints(include_extras=True)`` gives: keys a TypedDict
does not declare are refused (the APIs answer them with a 400), ``Required`` keys must be there,
and every value must fit its type (``Literal``, ``Union``/``Optional``, ``Iterable``/``Sequence``
/``List`` as JSON arrays, ``Dict``, nested TypedDicts, pydantic models). Tests only.
"""

from __future__ import annotations

import collections.abc as cabc
import types
import typing
from typing import Any

import typing_extensions as te

_SEQUENCES = {list, cabc.Iterable, cabc.Sequence, cabc.Collection, tuple, set, frozenset}
_MAPPINGS = {dict, cabc.Mapping, cabc.MutableMapping}


def problems(value: Any, tp: Any, path: str = "$") -> list[str]:
    """Every way ``value`` fails ``tp``, as ``path: why`` lines (empty: it fits)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return []
    if origin in (typing.Annotated, te.Annotated):
        return problems(value, args[0], path)
    if origin in (te.Required, te.NotRequired, typing.Required, typing.NotRequired):
        return problems(value, args[0], path)
    if tp is type(None) or tp is None:
        return [] if value is None else [f"{path}: expected null, got {value!r:.60}"]
    if origin in (typing.Union, types.UnionType):
        found = [problems(value, a, path) for a in args]
        if any(not f for f in found):
            return []
        return [f"{path}: fits no member of {_name(tp)}: " + "; ".join(min(found, key=len))]
    if origin in (typing.Literal, te.Literal):
        return (
            []
            if value in args and type(value) in {type(a) for a in args}
            else [f"{path}: {value!r:.60} is not one of {args!r:.200}"]
        )
    if te.is_typeddict(tp):
        return _typeddict(value, tp, path)
    if origin in _SEQUENCES or getattr(tp, "__name__", "") == "SequenceNotStr":
        if not isinstance(value, list):
            return [f"{path}: expected an array, got {type(value).__name__}"]
        item = args[0] if args else Any
        return [p for i, v in enumerate(value) for p in problems(v, item, f"{path}[{i}]")]
    if origin in _MAPPINGS:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        item = args[1] if len(args) == 2 else Any
        return [p for k, v in value.items() for p in problems(v, item, f"{path}.{k}")]
    return _scalar(value, tp, path)


def _scalar(value: Any, tp: Any, path: str) -> list[str]:
    if hasattr(tp, "model_validate"):  # a pydantic model inside a param union (a reply block)
        try:
            tp.model_validate(value, strict=False)
        except Exception as exc:  # pydantic's ValidationError, reported as text
            return [f"{path}: not a {tp.__name__}: {str(exc).splitlines()[0]}"]
        return []
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        return [f"{path}: the checker does not know the type {tp!r}"]
    return [] if ok else [f"{path}: expected {_name(tp)}, got {type(value).__name__} {value!r:.60}"]


def _typeddict(value: Any, tp: Any, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({tp.__name__}), got {type(value).__name__}"]
    hints = typing.get_type_hints(tp, include_extras=True)
    out = [f"{path}.{k}: unknown key (not in {tp.__name__})" for k in value if k not in hints]
    for key, hint in hints.items():
        if key in value:
            out += problems(value[key], hint, f"{path}.{key}")
        elif _required(tp, hint):
            out.append(f"{path}.{key}: required by {tp.__name__}, missing")
    return out


def _required(tp: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (te.Required, typing.Required):
        return True
    if origin in (te.NotRequired, typing.NotRequired):
        return False
    return bool(getattr(tp, "__total__", True))


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)[:80]
