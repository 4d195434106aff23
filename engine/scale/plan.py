"""The block plan: which input items make up each block, fixed in ``RUN_DIR/blocks/plan.json``.

A block is the unit of exactly-once: it is assigned whole to one worker attempt (an *epoch*),
and a run resumed later (or on another cluster) must cut the input the same way, or records
would be adopted by the wrong block. So the plan stores, per block, the sha256 of its ids in
order; a run whose input no longer gives the same blocks stops with exit 2.

``generate``: a block is ``block_size`` consecutive input lines (blank, bad and repeated ones
included, so a block's extent never depends on what is in it). ``run``: ``block_size``
consecutive problems of the dataset.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from fairdistill.engine.errors import ConfigError, InputError, one_line
from fairdistill.engine.generate import parse_line
from fairdistill.engine.inputs import BadLines
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.rundir.store import atomic_write

GENERATE_BLOCK = 1000  # input lines per block (fair generate)
RUN_BLOCK = 25  # problems per block (fair run)


NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class Block(msgspec.Struct, frozen=True):
    id: str  # "b00000"
    start: NonNeg  # index of its first item (generate: 0-based line index)
    count: Annotated[int, msgspec.Meta(ge=1)]  # items (generate: raw lines) in it
    ids_sha256: str  # sha256 of its ids, "\n"-joined, in input order
    offset: NonNeg = 0  # generate: byte offset of its first line in the input
    skip: tuple[int, ...] = ()  # generate: 1-based line numbers that repeat an earlier id


class Plan(msgspec.Struct):
    kind: Literal["generate", "run"]
    source: str  # the input file or dataset it was made from (informative)
    block_size: Annotated[int, msgspec.Meta(ge=1)]
    items: NonNeg  # ids in the plan
    blocks: list[Block]
    bad_lines: NonNeg = 0
    duplicate_ids: NonNeg = 0


def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / "blocks" / "plan.json"


def block_name(i: int) -> str:
    return f"b{i:05d}"


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def generate_plan(input_path: Path, block_size: int, report: bool = True) -> Plan:
    """Cut an input JSONL into blocks of ``block_size`` lines; bad lines are reported here, once
    (``file:line: why``), and skipped by the workers; a repeated id is skipped where it repeats."""
    blocks: list[Block] = []
    first_seen: dict[str, int] = {}
    bad = dups = 0
    reported = BadLines(report)  # bad and duplicate lines, as the single-process run names them
    ids: list[str] = []
    skip: list[int] = []
    offset = start_offset = 0
    lineno = 0

    def close(upto: int) -> None:
        start = len(blocks) * block_size
        blocks.append(
            Block(block_name(len(blocks)), start, upto - start, _digest(ids), start_offset, tuple(skip))
        )
        ids.clear()
        skip.clear()

    with open(input_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if (lineno - 1) % block_size == 0 and lineno > 1:
                close(lineno - 1)
                start_offset = offset
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                record_id, _ = parse_line(raw, f"{input_path}:{lineno}")
            except InputError as exc:
                bad += 1
                reported.append(exc)
                continue
            first = first_seen.setdefault(record_id, lineno)
            if first != lineno:
                dups += 1
                skip.append(lineno)
                reported.skip(
                    f"{input_path}:{lineno}: duplicate id {one_line(record_id, 80)!r} (first on line {first})"
                )
                continue
            ids.append(record_id)
    if lineno:
        close(lineno)
    reported.close()
    return Plan("generate", str(input_path), block_size, len(first_seen), blocks, bad, dups)


def run_plan(problem_ids: Iterable[str], source: str, block_size: int) -> Plan:
    """Cut a dataset's problem ids (in dataset order) into blocks of ``block_size``."""
    blocks: list[Block] = []
    ids: list[str] = []
    n = 0
    for pid in problem_ids:
        ids.append(pid)
        n += 1
        if len(ids) == block_size:
            blocks.append(Block(block_name(len(blocks)), n - len(ids), len(ids), _digest(ids)))
            ids = []
    if ids:
        blocks.append(Block(block_name(len(blocks)), n - len(ids), len(ids), _digest(ids)))
    return Plan("run", source, block_size, n, blocks)


def settle(run_dir: Path, make: Callable[[int], Plan], size_flag: int | None, default: int) -> Plan:
    """The plan of this run: ``make(block_size)`` on a new run directory (written down), the
    stored one if the input still gives the same blocks (the stored block size is kept unless
    ``--block-size`` says otherwise); ``ConfigError`` (exit 2) naming the first difference."""
    path = plan_path(run_dir)
    if not path.exists():
        fresh = make(size_flag or default)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, msgspec.json.format(msgspec.json.encode(fresh)))
        return fresh
    try:
        stored = msgspec.json.decode(path.read_bytes(), type=Plan)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path}: unreadable block plan ({one_line(str(exc), 200)})") from None
    if size_flag is not None and stored.block_size != size_flag:
        raise ConfigError(
            f"--block-size {size_flag}: {run_dir} was planned with blocks of {stored.block_size}; "
            "drop --block-size or use a new run directory"
        )
    fresh = make(stored.block_size)
    verify(stored, fresh, path)
    return stored


def verify(stored: Plan, fresh: Plan, path: Path) -> None:
    """``stored`` must be exactly the plan the input gives now (every block's ids and their
    digest, start, size, byte offset and skipped lines; the totals): an edited plan would read
    lines twice and others never. ``ConfigError`` (exit 2) naming ``path`` and the difference."""
    if stored.kind != fresh.kind:
        raise ConfigError(f"{path}: planned for `fair {stored.kind}`, not `fair {fresh.kind}`")
    if len(stored.blocks) != len(fresh.blocks):
        raise ConfigError(
            f"{path}: {len(stored.blocks)} blocks, but the input ({fresh.source}) gives "
            f"{len(fresh.blocks)}: the input changed or the plan was edited; use a new run directory"
        )
    for i, (old, new) in enumerate(zip(stored.blocks, fresh.blocks, strict=True)):
        if old.ids_sha256 != new.ids_sha256 or old.count != new.count:
            raise ConfigError(
                f"{path}: block {i} ({old.id}, items {old.start}-{old.start + old.count - 1}) holds other "
                f"ids than the input ({fresh.source}) gives now: the input changed or the plan was edited; "
                "use a new run directory"
            )
        for field in old.__struct_fields__:
            if getattr(old, field) != getattr(new, field):
                raise ConfigError(
                    f"{path}: block {i} `{field}` is {one_line(str(getattr(old, field)), 80)}, the input "
                    f"gives {one_line(str(getattr(new, field)), 80)}: the plan was edited; use a new run "
                    "directory (or restore the plan)"
                )
    for field in ("items", "bad_lines", "duplicate_ids"):
        if getattr(stored, field) != getattr(fresh, field):
            raise ConfigError(
                f"{path}: `{field}` is {getattr(stored, field)}, the input gives {getattr(fresh, field)}: "
                "the input changed or the plan was edited; use a new run directory"
            )


class ProblemBlocks:
    """A ``fair run`` plan's problems, streamed from the dataset in block order: a block's problems
    are read when it is first handed out and held until ``drop`` (a block whose worker died is
    handed out again), so the driver holds the blocks in flight, never the whole dataset. Blocks
    not in ``wanted`` (done in an earlier run) are read past and not kept."""

    def __init__(self, problems: Iterable[Problem], plan: Plan, wanted: set[str]):
        self._it = iter(problems)
        self._blocks = plan.blocks
        self._next = 0  # the next block to read from the stream
        self._wanted = wanted
        self._held: dict[str, list[Problem]] = {}

    def get(self, block: Block) -> list[Problem]:
        while block.id not in self._held:
            if self._next >= len(self._blocks) or self._blocks[self._next].start > block.start:
                raise ConfigError(f"block {block.id}: asked for after it was dropped or read past")
            b = self._blocks[self._next]
            self._next += 1
            items = list(itertools.islice(self._it, b.count))
            if len(items) != b.count or _digest([p.id for p in items]) != b.ids_sha256:
                raise ConfigError(
                    f"the dataset changed while the run was going (block {b.id}, items "
                    f"{b.start}-{b.start + b.count - 1}); run again to check it against the plan"
                )
            if b.id in self._wanted:
                self._held[b.id] = items
        return self._held[block.id]

    def drop(self, block_id: str) -> None:
        """The block is done: forget its problems."""
        self._held.pop(block_id, None)

    def __len__(self) -> int:
        """Blocks held now."""
        return len(self._held)


def read_lines(input_path: Path, block: Block) -> Iterator[tuple[int, bytes]]:
    """A generate block's (line number, raw line) pairs, repeated ids left out."""
    skip = set(block.skip)
    with open(input_path, "rb") as f:
        f.seek(block.offset)
        for i in range(block.count):
            raw = f.readline()
            if not raw:
                return
            lineno = block.start + i + 1
            if lineno not in skip:
                yield lineno, raw
