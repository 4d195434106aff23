"""Training targets with or without the teacher's reasoning: ``[samples] reasoning`` of a run.

A sample keeps the teacher's reasoning trace apart from its ``response`` (``Sample.reasoning``);
whether training sees it is decided when the samples are read, by the run's own config
(``RUN_DIR/config.toml``, ``[samples] reasoning = "drop" | "think"``), so ``fair export`` and
``fair train`` agree and a changed mind needs no new API calls. ``think`` puts the trace before
the answer as a ``<think>...</think>`` block (``Sample.target``), the format today's open
reasoning models are trained on. A pure module: the trainer imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from fairdistill.engine.rundir.schema import Sample

MODES = ("drop", "think")


def reasoning_mode(run_dir: str | Path) -> str:
    """``[samples] reasoning`` of the run's resolved config; ``drop`` when it says nothing (a run
    written before the field existed, or a folder of samples without a config)."""
    try:
        raw = msgspec.toml.decode(Path(run_dir, "config.toml").read_bytes())
    except (OSError, msgspec.DecodeError, UnicodeDecodeError):
        return "drop"  # a damaged config is reported by whoever loads it as a config
    samples = raw.get("samples") if isinstance(raw, dict) else None
    mode = samples.get("reasoning") if isinstance(samples, dict) else None
    return mode if mode in MODES else "drop"


def with_targets(samples: Iterable[Sample], mode: str) -> Iterator[Sample]:
    """``samples`` with ``response`` set to the training target of ``mode``."""
    for s in samples:
        target = s.target(mode)
        yield s if target is s.response else msgspec.structs.replace(s, response=target)
