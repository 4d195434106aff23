"""``read``: the records of a run directory, streamed, and as a Hugging Face dataset.

Records come through the run directory's one reader (``engine.rundir``), so a damaged line is
the same ``DamagedRunError`` naming ``file:line`` that ``fair status`` reports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine.errors import UsageError
from fairdistill.engine.rundir.schema import KINDS, Record
from fairdistill.engine.rundir.store import iter_records


class Records:
    """The records of one kind of a run directory; iterate it (streamed, never all in memory)
    or turn it into a ``datasets.Dataset``.

    >>> samples = read(tmp / "job", "samples")
    >>> all(s.problem_id and s.response for s in samples)
    True
    >>> ds = samples.to_dataset()
    >>> ds.num_rows == len(list(samples)), "messages" in ds.column_names
    (True, True)
    """

    def __init__(self, run_dir: str | os.PathLike, kind: str):
        if kind not in KINDS:
            raise UsageError(f"fairdistill.read: unknown kind {kind!r} (have {', '.join(KINDS)})")
        self.run_dir, self.kind = Path(run_dir), kind
        if not self.run_dir.is_dir():
            raise UsageError(f"fairdistill.read: {self.run_dir}: no such run directory")

    def __iter__(self) -> Iterator[Record]:
        return iter_records(self.run_dir, self.kind)

    def __repr__(self) -> str:
        return f"Records({str(self.run_dir)!r}, {self.kind!r})"

    def to_dataset(self) -> Any:
        """A ``datasets.Dataset`` with one row per record (needs ``pip install datasets``)."""
        try:
            import datasets
        except ImportError:
            raise UsageError("to_dataset needs the `datasets` package: pip install datasets") from None
        return datasets.Dataset.from_generator(
            _rows, gen_kwargs={"run_dir": str(self.run_dir), "kind": self.kind}
        )


def _rows(run_dir: str, kind: str) -> Iterator[dict[str, Any]]:
    for record in iter_records(Path(run_dir), kind):
        yield msgspec.to_builtins(record)


def read(run_dir: str | os.PathLike, kind: str = "samples") -> Records:
    """The ``kind`` records (``samples``, ``rationales``, ``reviews``, ``responses``...) of a run
    directory of ``fair run`` / ``fair generate`` / ``fairdistill.run``."""
    return Records(run_dir, kind)
