"""``fair export RUN_DIR --format trl|sharegpt|llamafactory|axolotl [--out DIR]``.

A run's ``samples`` in the formats the popular fine-tuning stacks read, one file per task
(``rationale``, ``mistake``) plus a combined one (``all``). Every row keeps the sample's ``id``
and ``task`` as extra columns.

=============  ==========================================================================
format         files in ``--out`` (default ``RUN_DIR/export/FORMAT``)
=============  ==========================================================================
trl            ``{task}.jsonl``: conversational prompt-completion, as TRL's SFTTrainer takes
               it: ``{"prompt": [messages], "completion": [{"role": "assistant", ...}]}``
sharegpt       ``{task}.jsonl``: ``{"conversations": [{"from": "system"|"human"|"gpt",
               "value": ...}]}``
llamafactory   ``fair_{task}.json`` (sharegpt style, system prompt in its own column) and
               ``dataset_info.json`` registering ``fair_{task}`` with ``formatting``,
               ``columns`` and ``tags``; an existing ``dataset_info.json`` (e.g. --out
               LLaMA-Factory/data) is updated, its other entries kept
axolotl        ``{task}.jsonl`` with ``messages`` (``type: chat_template`` datasets) and
               ``axolotl.yaml``: the ``datasets:`` entries to paste into an axolotl config,
               training on assistant turns only
=============  ==========================================================================

Records are streamed: memory does not grow with the run. Files are written under a temporary
name and renamed when complete. Engine side: no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from fairdistill.engine.errors import ConfigError
from fairdistill.engine.jsonfile import read_json_object
from fairdistill.engine.rundir.schema import Sample
from fairdistill.engine.rundir.store import iter_records
from fairdistill.engine.rundir.targets import reasoning_mode, with_targets

FORMATS = ("trl", "sharegpt", "llamafactory", "axolotl")
TASKS = ("rationale", "mistake")
SPLITS = (*TASKS, "all")

SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


# -- one sample -> one row, per format --------------------------------------------------------
def _messages(s: Sample) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in s.messages]


def trl_row(s: Sample) -> dict[str, Any]:
    return {
        "prompt": _messages(s),
        "completion": [{"role": "assistant", "content": s.response}],
        "task": s.task,
        "id": s.id,
    }


def sharegpt_row(s: Sample) -> dict[str, Any]:
    turns = [{"from": SHAREGPT_ROLES.get(m.role, m.role), "value": m.content} for m in s.messages]
    turns.append({"from": "gpt", "value": s.response})
    return {"conversations": turns, "task": s.task, "id": s.id}


def llamafactory_row(s: Sample) -> dict[str, Any]:
    """Sharegpt style as LLaMA-Factory wants it: leading system turns in ``system``, then strictly
    alternating human/gpt turns (consecutive turns of one role are joined)."""
    msgs = [*_messages(s), {"role": "assistant", "content": s.response}]
    system = []
    while msgs and msgs[0]["role"] == "system":
        system.append(msgs.pop(0)["content"])
    turns: list[dict[str, str]] = []
    for m in msgs:
        who = "gpt" if m["role"] == "assistant" else "human"  # a late system turn is read as the user's
        if turns and turns[-1]["from"] == who:
            turns[-1]["value"] += "\n\n" + m["content"]
        else:
            turns.append({"from": who, "value": m["content"]})
    return {"conversations": turns, "system": "\n\n".join(system), "task": s.task, "id": s.id}


def axolotl_row(s: Sample) -> dict[str, Any]:
    return {
        "messages": [*_messages(s), {"role": "assistant", "content": s.response}],
        "task": s.task,
        "id": s.id,
    }


ROWS: dict[str, Callable[[Sample], dict[str, Any]]] = {
    "trl": trl_row,
    "sharegpt": sharegpt_row,
    "llamafactory": llamafactory_row,
    "axolotl": axolotl_row,
}


def file_name(fmt: str, split: str) -> str:
    return f"fair_{split}.json" if fmt == "llamafactory" else f"{split}.jsonl"


# -- writers ----------------------------------------------------------------------------------
class _Writer:
    """JSONL, or a JSON array written element by element; temp name until closed."""

    def __init__(self, path: Path, array: bool):
        self.path, self.array, self.count = path, array, 0
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        if array:
            self.f.write(b"[\n")

    def write(self, row: dict[str, Any]) -> None:
        data = orjson.dumps(row)
        if self.array:
            self.f.write((b",\n" if self.count else b"") + data)
        else:
            self.f.write(data + b"\n")
        self.count += 1

    def close(self) -> None:
        if self.array:
            self.f.write(b"\n]\n" if self.count else b"]\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)


def _samples(run_dir: Path) -> Iterator[Sample]:
    """The run's samples once each, their targets as ``[samples] reasoning`` says (targets.py)."""
    seen: set[str] = set()
    for s in with_targets(iter_records(run_dir, "samples", Sample), reasoning_mode(run_dir)):
        if s.id not in seen:  # several writers may share a run directory
            seen.add(s.id)
            yield s


def dataset_info(files: dict[str, str]) -> dict[str, Any]:
    """LLaMA-Factory ``dataset_info.json`` entries for ``{dataset name: file name}``."""
    return {
        name: {
            "file_name": fname,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
        }
        for name, fname in files.items()
    }


def axolotl_yaml(paths: dict[str, Path]) -> str:
    """The ``datasets:`` block of an axolotl config (JSON-quoted strings are valid YAML)."""

    def entry(path: Path, indent: str = "") -> list[str]:
        return [
            f"{indent}  - path: {json.dumps(str(path.resolve()))}",
            f"{indent}    ds_type: json",
            f"{indent}    type: chat_template",
            f"{indent}    field_messages: messages",
            f"{indent}    message_property_mappings:",
            f"{indent}      role: role",
            f"{indent}      content: content",
            f'{indent}    roles_to_train: ["assistant"]',
            f"{indent}    train_on_eos: turn",
        ]

    lines = [
        "# fair export --format axolotl: paste into your axolotl config.",
        "# The student's own chat template formats the conversations; only assistant turns are trained.",
        "chat_template: tokenizer_default",
        "datasets:",
        *entry(paths["all"]),
        "# or one task only:",
    ]
    for task in TASKS:
        lines += [f"# {task}:", *("#" + line for line in entry(paths[task]))]
    return "\n".join(lines) + "\n"


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    """Write the run's samples in ``fmt``; returns ``{"out", "files": {name: rows}, ...}``."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    out_dir = Path(out) if out else run_dir / "export" / fmt
    info_path = out_dir / "dataset_info.json"  # LLaMA-Factory's registry: ours are added to it
    info = read_json_object(info_path) if fmt == "llamafactory" and info_path.exists() else {}
    out_dir.mkdir(parents=True, exist_ok=True)

    paths = {split: out_dir / file_name(fmt, split) for split in SPLITS}
    writers = {split: _Writer(path, array=fmt == "llamafactory") for split, path in paths.items()}
    to_row = ROWS[fmt]
    try:
        for sample in _samples(run_dir):
            row = to_row(sample)
            writers[sample.task].write(row)
            writers["all"].write(row)
    finally:
        for w in writers.values():
            w.close()
    counts = {paths[s].name: writers[s].count for s in SPLITS}

    if fmt == "llamafactory":
        info.update(dataset_info({f"fair_{s}": paths[s].name for s in SPLITS}))
        info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        counts[info_path.name] = len(SPLITS)
    elif fmt == "axolotl":
        (out_dir / "axolotl.yaml").write_text(axolotl_yaml(paths))
        counts["axolotl.yaml"] = 1
    return {"format": fmt, "out": str(out_dir), "files": counts, "samples": writers["all"].count}


def cli_main(args: argparse.Namespace) -> int:
    result = export(args.run_dir, args.format, args.out)
    for name, count in result["files"].items():
        print(f"  {Path(result['out']) / name}  ({count})", file=sys.stderr)
    if not result["samples"]:
        print(f"fair export: {args.run_dir} has no samples yet; wrote empty files", file=sys.stderr)
    print(f"fair export: {result['samples']} samples as {args.format} in {result['out']}", file=sys.stderr)
    return 0
