"""Flags that only apply together, in one table checked before any command runs.

A flag given where it does nothing (``--pilot`` without ``--estimate``, ``--lora-rank`` with
``--full``) is refused with one line (exit 2) instead of being ignored in silence: the user
meant something by it. ``--batch-*`` without ``--mode batch`` is checked by ``fair generate``
itself (``engine.generate``), next to the batch flags' own table.

A flag whose default would hide whether it was given is declared with ``default=None`` and gets
its default here (``LATE_DEFAULTS``), after the check.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from fairdistill.engine.errors import UsageError


@dataclass(frozen=True)
class Needs:
    """``flag`` (attribute ``attr``) applies only when ``applies(args)``; ``why`` says when."""

    flag: str
    attr: str
    applies: Callable[[argparse.Namespace], bool]
    why: str


def _ray(a: argparse.Namespace) -> bool:
    return getattr(a, "ray", None) is not None


RAY = (
    Needs("--workers", "workers", _ray, "needs --ray (e.g. --ray local --workers N)"),
    Needs("--block-size", "block_size", _ray, "needs --ray (e.g. --ray local --block-size N)"),
)
VLLM_ONLY = "applies only to the vLLM backend (--backend vllm or auto)"


def _vllm(off: str) -> tuple[Needs, ...]:
    """vLLM's own flags: refused when ``--backend`` is ``off`` (the backend without vLLM)."""
    return tuple(
        Needs(flag, attr, lambda a: a.backend != off, VLLM_ONLY)
        for flag, attr in (
            ("--gpu-memory-utilization", "gpu_memory_utilization"),
            ("--max-lora-rank", "max_lora_rank"),
        )
    )


RULES: dict[str, tuple[Needs, ...]] = {
    "run": (
        Needs("--pilot", "pilot", lambda a: a.estimate, "applies only with --estimate"),
        Needs("--metrics-port", "metrics_port", lambda a: not a.estimate, "does nothing with --estimate"),
        *RAY,
    ),
    "generate": (
        *RAY,
        Needs(
            "--compress",
            "compress",
            lambda a: a.compress == "none" or a.ray is None,
            "is not supported with --ray yet",
        ),
        Needs(
            "--no-key-affinity", "no_key_affinity", lambda a: bool(a.key), "applies only with --key (a pool)"
        ),
    ),
    "serve-student": _vllm("cpu"),
    "eval": (
        *_vllm("transformers"),
        Needs(
            "--no-base", "no_base", lambda a: bool(a.adapter), "needs an --adapter (else nothing to score)"
        ),
    ),
    "train": (Needs("--lora-rank", "lora_rank", lambda a: not a.full, "does not apply with --full"),),
}

LATE_DEFAULTS: dict[str, dict[str, object]] = {"run": {"pilot": 20}}


def given(args: argparse.Namespace, attr: str) -> bool:
    """The flag was on the command line (its value is not the None/False of an absent flag)."""
    value = getattr(args, attr, None)
    return value is not None and value is not False  # (`not in (None, False)` would miss a 0)


def check_flags(args: argparse.Namespace) -> None:
    """Raise ``UsageError`` naming every flag that does not apply; then fill the late defaults."""
    command = getattr(args, "command", None)
    wrong = [
        f"{n.flag} {n.why}"
        for n in RULES.get(command or "", ())
        if given(args, n.attr) and not n.applies(args)
    ]
    if wrong:
        raise UsageError("; ".join(wrong) + " (refused: it would be ignored)")
    for attr, value in LATE_DEFAULTS.get(command or "", {}).items():
        if getattr(args, attr, None) is None:
            setattr(args, attr, value)
