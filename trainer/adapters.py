"""Naming the LoRA adapters a student server serves: shared by the CPU server (``serve``) and the
vLLM backend (``vllm_backend``), below both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def parse_adapters(adapter: str | Path | Sequence | Mapping | None) -> dict[str, Path]:
    """``DIR``, ``NAME=DIR``, a list of those, or ``{name: dir}`` → ``{name: dir}``.

    A bare ``DIR`` is served under its folder name (vLLM needs ``--lora-modules name=path``).
    """
    if adapter is None or adapter == "":
        return {}
    if isinstance(adapter, Mapping):
        return {str(k): Path(v) for k, v in adapter.items()}
    items = [adapter] if isinstance(adapter, str | Path) else list(adapter)
    out: dict[str, Path] = {}
    for item in items:
        text = str(item)
        name, sep, path = text.partition("=")
        if not sep or not name or "/" in name:  # a path that merely contains "="
            name, path = Path(text).resolve().name, text
        out[name] = Path(path)
    return out
