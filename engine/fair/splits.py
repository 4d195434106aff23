"""Provenance of questions, so a student is never scored on questions it was trained on.

    ids_digest(ids)                    -> sha256 of the sorted problem ids (order-free)
    manifest_fields(dataset, ids)      -> what a run's manifest records: dataset, split, id digest
    training_record(run_dirs, samples) -> what a trained folder records: each run dir with its
                                          dataset, split and digests, and the trained problem ids
    find_training_record(folder)       -> that record for an adapter/model folder (or its parent)
    overlaps(record, problems)         -> {"dataset/split": [problem ids]} seen in training

Problem ids carry their dataset and, where the dataset has fixed splits, the split
(``gsm8k-train-00042``); SVAMP's are its own ``svamp-chal-1`` whatever the seeded split, so the
check is by id, never by split name. Pure Python: the trainer imports this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fairdistill.engine.config import DatasetSection
from fairdistill.engine.errors import UsageError
from fairdistill.engine.jsonfile import read_json_object
from fairdistill.engine.rundir.store import read_manifest

RECORD = "fair_training.json"


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of the sorted, newline-joined ids: the same set gives the same digest."""
    h = hashlib.sha256()
    for i in sorted(set(ids)):
        h.update(i.encode() + b"\n")
    return h.hexdigest()


def manifest_fields(dataset: DatasetSection, problem_ids: Iterable[str]) -> dict[str, Any]:
    """The manifest's provenance keys for a run over ``problem_ids`` of a ``[dataset]`` section."""
    ids = set(problem_ids)
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "problem_ids_sha256": ids_digest(ids),
        "problem_ids_n": len(ids),
    }


def training_record(run_dirs: Iterable[str | Path], samples: Iterable) -> dict:
    """What a trained folder keeps: its input runs (with their digests) and the trained ids."""
    samples = list(samples)
    runs = []
    for d in run_dirs:
        m = read_manifest(d) or {}
        runs.append(
            {
                "run_dir": str(Path(d).resolve()),
                "dataset": m.get("dataset"),
                "split": m.get("split"),
                "problem_ids_sha256": m.get("problem_ids_sha256"),
                "problem_ids_n": m.get("problem_ids_n"),
            }
        )
    trained = sorted({s.problem_id for s in samples})
    return {"runs": runs, "problem_ids_sha256": ids_digest(trained), "problem_ids": trained}


def write_training_record(folder: str | Path, record: dict) -> Path:
    path = Path(folder) / RECORD
    path.write_text(json.dumps(record, indent=1))
    return path


def find_training_record(folder: str | Path) -> dict | None:
    """The record of a trained folder: in it, or in its parent (``OUT/adapter`` -> ``OUT``).
    A damaged one is ``UsageError`` naming it (exit 2): the overlap check must not pass blind."""
    for f in (Path(folder), Path(folder).parent):
        if (f / RECORD).is_file():
            return check_record(f / RECORD, read_json_object(f / RECORD, HINT))
    return None


HINT = "restore it from the training output, or delete it to skip the overlap check"


def check_record(path: Path, record: dict) -> dict:
    """``record`` if its ``problem_ids`` is a list of strings and ``runs`` a list of objects."""
    ids, runs = record.get("problem_ids", []), record.get("runs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UsageError(f"{path}: field 'problem_ids': expected a list of strings; {HINT}")
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise UsageError(f"{path}: field 'runs': expected a list of objects; {HINT}")
    return record


def overlaps(record: dict, problems: Iterable, split: str) -> dict[str, list[str]]:
    """Evaluation problems whose id the student was trained on, by ``dataset/split``."""
    trained = set(record.get("problem_ids", ()))
    out: dict[str, list[str]] = {}
    for p in problems:
        if p.id in trained:
            out.setdefault(f"{p.dataset or 'problems'}/{split}", []).append(p.id)
    return out
