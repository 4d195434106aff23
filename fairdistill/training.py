"""``train`` and ``evaluate``: the trainer from Python (needs ``pip install 'fairdistill[train]'``).

torch is imported only when one of them is called, so ``import fairdistill`` stays light.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine.errors import ConfigError, UsageError


def _trainer(module: str) -> Any:
    try:
        return importlib.import_module(f"fairdistill.trainer.{module}")
    except ImportError as exc:
        raise UsageError(
            f"fairdistill.{module}: needs the train extra: pip install 'fairdistill[train]' ({exc})"
        ) from None


def train(
    *run_dirs: str | os.PathLike, out: str | os.PathLike = "runs/train", **options: Any
) -> dict[str, Any]:
    """Fine-tune the student on the samples of ``run_dirs``, as ``fair train`` does; ``options``
    are the fields of the train config (``max_steps``, ``lr``, ``alpha``, ``batching``...).
    Returns the summary (``OUT/adapter`` holds the adapter)."""
    t = _trainer("train")
    fields = {"inputs": [str(Path(d)) for d in run_dirs], "out": str(out), **options}
    try:
        cfg = msgspec.convert(fields, t.TrainConfig)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"fairdistill.train: {exc}") from None
    return t.train(cfg)


def evaluate(adapters: dict[str, str | os.PathLike] | None = None, *, datasets: str = "svamp",
             limit: int | None = None, **options: Any) -> dict[str, Any]:  # fmt: skip
    """Accuracy of the base model and ``adapters`` ({name: folder}) on the benchmarks' test split,
    as ``fair eval`` does (``options``: ``model``, ``backend``, ``max_new_tokens``, ``out``...)."""
    e = _trainer("evaluate")
    from fairdistill.engine.config import DatasetSection
    from fairdistill.engine.fair.datasets import load_problems

    names = [d.strip() for d in datasets.split(",") if d.strip()]
    problems = {n: load_problems(DatasetSection(name=n, split="test", limit=limit)) for n in names}
    return e.evaluate(adapters=adapters, problems=problems, **options)
