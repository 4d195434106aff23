"""Dataset loaders: every source becomes a list of ``Problem`` with a stable id and canonical gold.

    load_problems(cfg, data_dir=None, errors=None)   the [dataset] config section -> problems
    load_gsm8k / load_svamp / load_strategyqa / load_logiqa (local files)
    load_jsonl(path, fields, task)                   any JSONL, with a field mapping
    load_builtin()                                   the embedded offline set (engine/fair/data/)
    default_data_dir()                               $FAIR_DATA_DIR, else ../shared/datasets

Local layouts (``dataset.path`` = the file, the dataset's folder, or the folder holding it):

    gsm8k/{split}.jsonl       {question, answer "... #### 18"}           ids gsm8k-test-00042
    svamp/SVAMP.json          [{ID, Body, Question, Answer, ...}]        ids svamp-chal-1
    strategyqa/{split}.json   [{qid, question, answer: bool}]            ids strategyqa-<qid>
    logiqa/{Split}.txt        8-line blocks                              ids logiqa-test-00000

Splits: GSM8K test/train; StrategyQA dev (also "validation"/"eval"; "test" reads dev.json
when there is no test.json, as StrategyQA's own test split has no labels) and train; LogiQA
test, eval (also "validation"/"dev") and train; "all" is every split file present. When
``dataset.path`` is a file, a file named after a split (train.jsonl, Eval.txt) names the split
in the ids. SVAMP.json is one file of 1,000 problems: "all" is all of it, and "train"/"test"
are a seeded 700/300 split (``random.Random(0)`` shuffle of the positions, each part in file
order). That split is *not* the hub's: ChilleD/SVAMP is a shuffled 700/300 split of the same
problems whose membership is not recoverable offline (the FAIR release's 387 wrong train
answers lie at positions 2-997 of SVAMP.json). For the exact hub split use
``name = "ChilleD/SVAMP"`` online. LogiQA blocks that list options out of order ("A. C. B. D.")
are put in label order: the gold letter refers to the label (see ``_logiqa_options``).

Hub names (openai/gsm8k, ChilleD/SVAMP, ChilleD/StrategyQA, lucasmccabe/logiqa, or any other
with ``fields`` and ``task``) load through ``datasets.load_dataset``, imported only then; ids
are the same as for the local copies.

``offset`` and ``limit`` select from the problems that loaded, in file order; ids never depend
on them. Bad input (malformed JSON, a missing or invalid field, a duplicate id) raises
``InputError`` naming ``file:line`` and the field, or, when an ``errors`` list is passed, is
appended there and the line skipped. A missing file or an unknown name is a ``ConfigError``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from fairdistill.engine.config import DatasetSection
from fairdistill.engine.errors import ConfigError, InputError
from fairdistill.engine.fair.answers import normalize_gold
from fairdistill.engine.inputs import ErrorSink
from fairdistill.engine.rundir.schema import Problem

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = Path(__file__).resolve().parent / "data" / "builtin.jsonl"
TASKS = ("numeric", "yesno", "choice")
PROBLEM_FIELDS = ("id", "question", "answer", "context", "options", "task")
SVAMP_SEED = 0
SVAMP_TRAIN_FRACTION = 0.7

LOCAL_HUB = {  # local name -> hub name
    "gsm8k": "openai/gsm8k",
    "svamp": "ChilleD/SVAMP",
    "strategyqa": "ChilleD/StrategyQA",
    "logiqa": "lucasmccabe/logiqa",
}
HUB_NAMES = {hub.lower(): local for local, hub in LOCAL_HUB.items()}  # hub name -> record format

Errors = ErrorSink | None  # a list, or engine.inputs.BadLines (reports as it goes)
Record = Mapping[str, Any]


def default_data_dir() -> Path | None:
    """$FAIR_DATA_DIR, else ``<repo>/../shared/datasets``, else None."""
    env = os.environ.get("FAIR_DATA_DIR")
    candidates = ([Path(env)] if env else []) + [ROOT.parent / "shared" / "datasets"]
    return next((c for c in candidates if c.is_dir()), None)


# ---------------------------------------------------------------------------------------------
# errors


def _name(key: str, ours: str | None = None) -> str:
    """How a message names a field: 'label', or 'label' (answer) when mapped onto one of ours."""
    return f"'{key}'" if ours in (None, key) else f"'{key}' ({ours})"


def _bad(where: str, field: str | None, why: str) -> InputError:
    """An InputError naming the place (``file:line``) and the field."""
    if field is not None and not field.startswith("'"):
        field = _name(field)
    err = InputError(f"{where}: {why}" if field is None else f"{where}: field {field}: {why}")
    err.where, err.field = where, field  # type: ignore[attr-defined]
    return err


def _report(err: InputError, errors: Errors) -> None:
    if errors is None:
        raise err
    errors.append(err)


class _Ids:
    """Rejects duplicate ids: resume and dedup are by id."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def check(self, problem: Problem, where: str) -> None:
        if problem.id in self.seen:
            raise _bad(where, "id", f"duplicate id {problem.id!r} (first at {self.seen[problem.id]})")
        self.seen[problem.id] = where


def _fail(err: InputError) -> Callable[[], Problem]:
    """A builder that raises a line's parse error."""

    def fail() -> Problem:
        raise err

    return fail


def _collect(items: Iterable[tuple[str, Callable[[], Problem]]], errors: Errors) -> Iterator[Problem]:
    """Build each problem, reporting (or raising) the ones that fail, rejecting duplicate ids."""
    ids = _Ids()
    for where, build in items:
        try:
            problem = build()
            ids.check(problem, where)
        except InputError as err:
            _report(err, errors)
            continue
        yield problem


# ---------------------------------------------------------------------------------------------
# file readers


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed value or the InputError) for every non-blank line. A line that is
    not UTF-8 or nests too deeply is an InputError like malformed JSON: the other lines stay."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, _bad(where, None, _not_utf8(exc))
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, _bad(where, None, f"malformed JSON: {exc.msg} (column {exc.colno})")
            except RecursionError:
                yield where, _bad(where, None, "JSON nested too deeply")
            except ValueError:  # an integer of more than 4300 digits
                yield where, _bad(where, None, "a number in it is too long")


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})"


_SURROGATE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8 (surrogateescape)


def _read_text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 stay as lone surrogates (``surrogateescape``)
    so the item or line holding them can be reported and skipped, not the whole file."""
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    """(``file:line``, item) for every item of a JSON list file, with the line it starts on; an
    item holding bytes that are not UTF-8, or nested too deeply, comes as an InputError."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    pos = ws.match(text, 0).end()  # type: ignore[union-attr]
    if not text.startswith("[", pos):
        raise _bad(f"{path}:{text.count(chr(10), 0, pos) + 1}", None, "expected a JSON list")
    pos = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
    while pos < len(text) and text[pos] != "]":
        where = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        start = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:  # the rest of the file cannot be trusted
            raise _bad(where, None, f"malformed JSON: {exc.msg} (line {exc.lineno})") from None
        except RecursionError:
            raise _bad(where, None, "JSON nested too deeply") from None
        except ValueError:  # an integer of more than 4300 digits
            raise _bad(where, None, "a number in it is too long") from None
        if _SURROGATE.search(text, start, pos):
            item = _bad(where, None, "not UTF-8 text")
        yield where, item
        pos = ws.match(text, pos).end()  # type: ignore[union-attr]


def _build(rec: Any, where: str, make: Callable[[Any, str], Problem]) -> Problem:
    """``make(rec, where)``, or raise the InputError a reader put in place of the record."""
    if isinstance(rec, InputError):
        raise rec
    return make(rec, where)


def _field(rec: Any, key: str, where: str, *, name: str | None = None) -> Any:
    if not isinstance(rec, dict):
        raise _bad(where, None, f"expected a JSON object, got {type(rec).__name__}")
    label = _name(key, name)
    if key not in rec or rec[key] is None:
        raise _bad(where, label, "missing")
    return rec[key]


def _text(rec: Any, key: str, where: str, *, name: str | None = None) -> str:
    value = _field(rec, key, where, name=name)
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, _name(key, name), f"expected non-empty text, got {value!r}"[:200])
    return value.strip()


def _gold(value: Any, task: str, where: str, label: str = "answer") -> str:
    try:
        return normalize_gold(value, task)
    except ValueError as exc:
        raise _bad(where, label, f"invalid {task} answer: {exc}") from None


# ---------------------------------------------------------------------------------------------
# record converters (shared by the local files and the hub)


def _gsm8k_problem(rec: Record, where: str, split: str, index: int) -> Problem:
    question = _text(rec, "question", where)
    solution = _text(rec, "answer", where)
    if "####" not in solution:
        raise _bad(where, "answer", "no final '#### N' line")
    gold = _gold(solution.rsplit("####", 1)[1].strip(), "numeric", where)
    return Problem(
        id=f"gsm8k-{split}-{index:05d}", question=question, answer=gold, task="numeric", dataset="gsm8k"
    )


def _svamp_problem(rec: Record, where: str) -> Problem:
    body = _text(rec, "Body", where)
    question = _text(rec, "Question", where)
    ident = _field(rec, "ID", where)
    answer = _field(rec, "Answer", where)
    if isinstance(answer, str):
        answer = answer.strip()
    gold = _gold(answer, "numeric", where, "Answer")
    return Problem(
        id=f"svamp-{ident}", question=f"{body} {question}", answer=gold, task="numeric", dataset="svamp"
    )


def _strategyqa_problem(rec: Record, where: str) -> Problem:
    qid = _field(rec, "qid", where)
    question = _text(rec, "question", where)
    answer = _field(rec, "answer", where)
    if not isinstance(answer, bool):
        raise _bad(where, "answer", f"expected true/false, got {answer!r}")
    return Problem(
        id=f"strategyqa-{qid}", question=question, answer=_gold(answer, "yesno", where), task="yesno",
        dataset="strategyqa",
    )  # fmt: skip


def _logiqa_hub_problem(rec: Record, where: str, split: str, index: int) -> Problem:
    options = _field(rec, "options", where)
    if not isinstance(options, list) or len(options) != 4:
        raise _bad(where, "options", f"expected 4 options, got {options!r}"[:200])
    return Problem(
        id=f"logiqa-{split}-{index:05d}",
        question=_text(rec, "query", where),
        answer=_gold(_field(rec, "correct_option", where), "choice", where, "correct_option"),
        task="choice",
        dataset="logiqa",
        context=_text(rec, "context", where),
        options=tuple(str(o).strip() for o in options),
    )


def _options(value: Any, where: str, label: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [ln for ln in value.splitlines() if ln.strip()]
    if not isinstance(value, list) or not 2 <= len(value) <= 4 or not all(isinstance(o, str) for o in value):
        raise _bad(where, label, f"expected a list of 2-4 option texts, got {value!r}"[:200])
    return tuple(_strip_label(o, i) for i, o in enumerate(value))


def _strip_label(option: str, i: int) -> str:
    """'B. text' -> 'text' when the label is the option's own letter."""
    return re.sub(rf"^\s*\(?{'ABCD'[i]}\s*[.):]\s*", "", option.strip(), flags=re.I).strip()


def _generic_problem(
    rec: Any, where: str, fields: Mapping[str, str], task: str | None, dataset: str, index: int
) -> Problem:
    """One record of a JSONL file or hub dataset under a field mapping (ours -> theirs)."""
    key = {f: fields.get(f, f) for f in PROBLEM_FIELDS}
    if not isinstance(rec, dict):
        raise _bad(where, None, f"expected a JSON object, got {type(rec).__name__}")
    if task is None:
        task = _field(rec, key["task"], where, name="task")
        if task not in TASKS:
            raise _bad(where, _name(key["task"], "task"), f"expected one of {TASKS}, got {task!r}")
    ident = rec.get(key["id"])
    if ident is None:
        if "id" in fields:
            raise _bad(where, _name(key["id"], "id"), "missing")
        ident = f"{dataset}-{index:05d}"
    elif not isinstance(ident, str | int) or isinstance(ident, bool) or str(ident).strip() == "":
        raise _bad(where, _name(key["id"], "id"), f"expected text or an integer, got {ident!r}")
    answer = _field(rec, key["answer"], where, name="answer")
    options = None
    if rec.get(key["options"]) is not None:
        options = _options(rec[key["options"]], where, _name(key["options"], "options"))
    elif task == "choice" and "options" in fields:
        raise _bad(where, _name(key["options"], "options"), "missing")
    context = rec.get(key["context"])
    if context is not None and not isinstance(context, str):
        raise _bad(where, _name(key["context"], "context"), f"expected text, got {type(context).__name__}")
    gold = _gold(answer, task, where, _name(key["answer"], "answer"))
    if options is not None and task == "choice" and "ABCD".index(gold) >= len(options):
        raise _bad(where, _name(key["answer"], "answer"), f"{gold} but only {len(options)} options")
    return Problem(
        id=str(ident).strip(),
        question=_text(rec, key["question"], where, name="question"),
        answer=gold,
        task=task,  # type: ignore[arg-type]
        dataset=dataset,
        context=(context.strip() or None) if context else None,
        options=options,
    )


# ---------------------------------------------------------------------------------------------
# local loaders


def load_gsm8k(path: str | Path, *, split: str | None = None, errors: Errors = None) -> list[Problem]:
    """GSM8K JSONL ``{question, answer "... #### N"}``; ids ``gsm8k-<split>-<line index>``."""
    return list(_gsm8k(Path(path), split, errors))


def _gsm8k(path: Path, split: str | None, errors: Errors) -> Iterator[Problem]:
    split = split or path.stem

    def items() -> Iterator[tuple[str, Callable[[], Problem]]]:
        for index, (where, rec) in enumerate(_iter_jsonl(path)):
            if isinstance(rec, InputError):
                yield where, _fail(rec)
            else:
                yield where, partial(_gsm8k_problem, rec, where, split, index)

    return _collect(items(), errors)


def svamp_split(n: int, split: str) -> list[int]:
    """Positions of a SVAMP split: "all", or a seeded 70/30 "train"/"test" split (file order)."""
    if split in ("all", "full", "chal"):
        return list(range(n))
    order = list(range(n))
    random.Random(SVAMP_SEED).shuffle(order)
    cut = round(n * SVAMP_TRAIN_FRACTION)
    if split == "train":
        return sorted(order[:cut])
    if split == "test":
        return sorted(order[cut:])
    raise ConfigError(f"dataset.split: SVAMP has splits all, train, test; not {split!r}")


def load_svamp(path: str | Path, *, split: str = "all", errors: Errors = None) -> list[Problem]:
    """SVAMP.json; question = Body + " " + Question; ids ``svamp-<ID>``."""
    return list(_svamp(Path(path), split, errors))


def _svamp(path: Path, split: str, errors: Errors) -> Iterator[Problem]:
    try:
        records = list(_iter_json_array(path))
    except InputError as err:
        _report(err, errors)
        return iter(())
    keep = svamp_split(len(records), split)
    items = ((records[i][0], lambda r=records[i]: _build(r[1], r[0], _svamp_problem)) for i in keep)
    return _collect(items, errors)


def load_strategyqa(path: str | Path, *, errors: Errors = None) -> list[Problem]:
    """StrategyQA JSON list ``{qid, question, answer: bool}``; gold yes/no; ids ``strategyqa-<qid>``."""
    return list(_strategyqa(Path(path), errors))


def _strategyqa(path: Path, errors: Errors) -> Iterator[Problem]:
    try:
        records = list(_iter_json_array(path))
    except InputError as err:
        _report(err, errors)
        return iter(())
    return _collect(((w, partial(_build, r, w, _strategyqa_problem)) for w, r in records), errors)


_LABEL = re.compile(r"^\s*([A-Da-d])\s*[.．?:)]\s*|^\s*([A-D]) ")


def _logiqa_options(lines: list[str]) -> tuple[str, ...]:
    """The four options in letter order, labels stripped.

    Most blocks list "A." to "D." in order. Some list them out of order ("A. C. B. D."); the gold
    letter then refers to the label, not the position (checked by hand on such blocks), so
    options are put in label order when the four labels are exactly A-D. Otherwise the lines are
    taken by position and a label is stripped only where it is that position's own letter.
    """
    found = [_LABEL.match(ln) for ln in lines]
    labels = [(m[1] or m[2]).upper() if m else None for m in found]
    if sorted(x for x in labels if x) == list("ABCD"):
        by_label = {lab: ln[m.end() :].strip() for lab, ln, m in zip(labels, lines, found, strict=True)}  # type: ignore[union-attr]
        return tuple(by_label[x] for x in "ABCD")
    return tuple(_strip_label(ln, i) for i, ln in enumerate(lines))


def load_logiqa(path: str | Path, *, split: str | None = None, errors: Errors = None) -> list[Problem]:
    """LogiQA text: blocks of blank, gold letter, context, question, four options."""
    return list(_logiqa(Path(path), split, errors))


def _logiqa(path: Path, split: str | None, errors: Errors) -> Iterator[Problem]:
    split = (split or path.stem).lower()
    lines = _read_text(path).splitlines()

    def items() -> Iterator[tuple[str, Callable[[], Problem]]]:
        i, index = 0, 0
        while i < len(lines):
            if not lines[i].strip():
                i += 1
                continue
            where = f"{path}:{i + 1}"  # the letter line; the block is it and the next 6 lines
            block = lines[i : i + 7]
            bad = next((k for k, ln in enumerate(block) if _SURROGATE.search(ln)), None)
            if bad is not None and len(block) == 7 and _is_letter(block[0]):  # skip the block
                yield where, _fail(_bad(f"{path}:{i + 1 + bad}", None, "not UTF-8 text"))
                i += 7
            elif len(block) == 7 and all(ln.strip() for ln in block) and _is_letter(block[0]):
                yield where, partial(_logiqa_block, block, where, split, index)
                i += 7
            else:  # skip to the next blank line followed by a lone letter
                why = "expected a block of: letter a-d, context, question, 4 options"
                yield where, _fail(_bad(where, None, why))
                i += 1
                while i < len(lines) and not (not lines[i - 1].strip() and _is_letter(lines[i])):
                    i += 1
            index += 1

    return _collect(items(), errors)


def _is_letter(line: str) -> bool:
    return re.fullmatch(r"\s*[a-dA-D]\.?\s*", line) is not None


def _logiqa_block(block: list[str], where: str, split: str, index: int) -> Problem:
    letter = block[0].strip().rstrip(".").lower()
    return Problem(
        id=f"logiqa-{split}-{index:05d}",
        question=block[2].strip(),
        answer=letter.upper(),
        task="choice",
        dataset="logiqa",
        context=block[1].strip(),
        options=_logiqa_options(block[3:7]),
    )


def load_jsonl(
    path: str | Path,
    fields: Mapping[str, str] | None = None,
    task: str | None = None,
    *,
    dataset: str | None = None,
    errors: Errors = None,
) -> list[Problem]:
    """Any JSONL file. ``fields`` maps our names (id, question, answer, context, options, task)
    to the file's; unmapped names are looked up as themselves. Without ``task`` every line needs
    a ``task`` field. Lines without an id get ``<dataset>-<line index>``."""
    return list(_jsonl(Path(path), fields or {}, task, dataset, errors))


def _jsonl(
    path: Path, fields: Mapping[str, str], task: str | None, dataset: str | None, errors: Errors
) -> Iterator[Problem]:
    unknown = set(fields) - set(PROBLEM_FIELDS)
    if unknown:
        raise ConfigError(
            f"dataset.fields: unknown key(s) {sorted(unknown)}; expected some of {PROBLEM_FIELDS}"
        )
    if task is not None and task not in TASKS:
        raise ConfigError(f"dataset.task: expected one of {TASKS}, not {task!r}")
    name = dataset or path.stem

    def items() -> Iterator[tuple[str, Callable[[], Problem]]]:
        for index, (where, rec) in enumerate(_iter_jsonl(path)):
            if isinstance(rec, InputError):
                yield where, _fail(rec)
            else:
                yield where, partial(_generic_problem, rec, where, fields, task, name, index)

    return _collect(items(), errors)


def load_builtin(*, errors: Errors = None) -> list[Problem]:
    """The embedded offline problem set (arithmetic word problems, yes/no, multiple choice)."""
    return load_jsonl(BUILTIN, dataset="builtin", errors=errors)


# ---------------------------------------------------------------------------------------------
# hub


def _load_hub(
    name: str, split: str, fields: Mapping[str, str], task: str | None, errors: Errors
) -> Iterator[Problem]:
    """A dataset from the Hugging Face hub; ``datasets`` is imported only here."""
    kind = HUB_NAMES.get(name.lower())
    config = "main" if kind == "gsm8k" else None
    hub_split = {"eval": "validation", "dev": "validation"}.get(split, split) if kind == "logiqa" else split
    try:
        import datasets as hf  # optional and heavy: imported for hub names only
    except ImportError:
        raise ConfigError(
            f"dataset.name: {name!r} is a Hugging Face hub dataset and needs the `datasets` package "
            "(pip install datasets) and network access; offline, point dataset.path at a local copy"
        ) from None
    try:
        rows = hf.load_dataset(name, config, split=hub_split)
    except Exception as exc:  # offline, unknown name or split: say which and why
        raise ConfigError(
            f"dataset.name: could not load {name!r} (split {hub_split!r}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}. Offline, use a local copy (dataset.path / $FAIR_DATA_DIR)"
        ) from None
    if kind is None and task is None and "task" not in fields:
        raise ConfigError(f"dataset.task: hub dataset {name!r} needs task = numeric | yesno | choice")
    label = f"{name}[{hub_split}]"
    dataset = name.rsplit("/", 1)[-1]

    def items() -> Iterator[tuple[str, Callable[[], Problem]]]:
        for index, rec in enumerate(rows):
            where = f"{label}:{index}"
            if kind == "gsm8k":
                yield where, partial(_gsm8k_problem, rec, where, split, index)
            elif kind == "svamp":
                yield where, partial(_svamp_problem, rec, where)
            elif kind == "strategyqa":
                yield where, partial(_strategyqa_problem, rec, where)
            elif kind == "logiqa":
                yield where, partial(_logiqa_hub_problem, rec, where, split, index)
            else:
                yield where, partial(_generic_problem, rec, where, fields, task, dataset, index)

    return _collect(items(), errors)


# ---------------------------------------------------------------------------------------------
# the config entry point

_SPLIT_ALIASES = {
    "gsm8k": {},
    "strategyqa": {"validation": "dev", "eval": "dev", "val": "dev"},
    "logiqa": {"validation": "eval", "dev": "eval", "val": "eval"},
}
_SPLITS = {  # what split = "all" covers, where the files exist
    "gsm8k": ("train", "test"),
    "strategyqa": ("train", "dev"),
    "logiqa": ("train", "eval", "test"),
}
_FILES = {
    "gsm8k": lambda s: [f"{s}.jsonl"],
    "svamp": lambda s: ["SVAMP.json", "svamp.json"],
    # StrategyQA's own test split has no labels: its labelled dev split is the test set in use
    "strategyqa": lambda s: [f"{s}.json", f"strategyqa_{s}.json"] + (["dev.json"] if s == "test" else []),
    "logiqa": lambda s: [f"{s.capitalize()}.txt", f"{s}.txt"],
}


def _folders(name: str, path: str | None, data_dir: Path | None) -> list[Path]:
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"dataset.path: {p} does not exist")
        return [p, p / name]
    base = data_dir or default_data_dir()
    if base is None:
        raise ConfigError(
            f"dataset.path: no local copy of {name!r}: set dataset.path or $FAIR_DATA_DIR, "
            f"or use the hub name {LOCAL_HUB[name]!r} online"
        )
    return [base / name, base]


def _find(folders: list[Path], names: list[str]) -> Path | None:
    return next((f / n for f in folders for n in names if (f / n).is_file()), None)


def _local_files(name: str, split: str, path: str | None, data_dir: Path | None) -> list[tuple[str, Path]]:
    """(split, file) pairs to read: ``path`` itself when it is a file, else looked up in folders."""
    if path is not None and Path(path).expanduser().is_file():
        given = Path(path).expanduser()
        stem = given.stem.lower()
        return [(stem if stem in _SPLITS.get(name, ()) else split, given)]
    folders = _folders(name, path, data_dir)
    if split == "all" and name in _SPLITS:
        found = [(s, f) for s in _SPLITS[name] if (f := _find(folders, _FILES[name](s)))]
        if found:
            return found
        wanted = [n for s in _SPLITS[name] for n in _FILES[name](s)]
    else:
        wanted = _FILES[name](split)
        file = _find(folders, wanted)
        if file is not None:
            return [(split, file)]
    raise ConfigError(
        f"dataset.split: no {name} split {split!r} in {folders[0]} (looked for {', '.join(wanted)}); "
        f"online, name = {LOCAL_HUB[name]!r} loads it from the hub"
    )


def _local(name: str, split: str, file: Path, errors: Errors) -> Iterator[Problem]:
    if name == "gsm8k":
        return _gsm8k(file, split, errors)
    if name == "svamp":
        return _svamp(file, split, errors)
    if name == "strategyqa":
        return _strategyqa(file, errors)
    return _logiqa(file, split, errors)


def iter_problems(
    cfg: DatasetSection, *, data_dir: Path | None = None, errors: Errors = None
) -> Iterator[Problem]:
    """The problems of a ``[dataset]`` section, lazily, offset and limit applied."""
    if cfg.offset < 0 or (cfg.limit is not None and cfg.limit < 0):
        raise ConfigError("dataset.offset / dataset.limit must be >= 0")
    name = cfg.name.strip()
    key = name.lower()
    split = cfg.split.strip().lower()
    if key == "builtin":
        source: Iterable[Problem] = load_builtin(errors=errors)
    elif key == "jsonl":
        if not cfg.path:
            raise ConfigError("dataset.path: name = 'jsonl' needs the path of a .jsonl file")
        if not Path(cfg.path).expanduser().is_file():
            raise ConfigError(f"dataset.path: {cfg.path} is not a file")
        source = _jsonl(Path(cfg.path).expanduser(), cfg.fields, cfg.task, None, errors)
    elif key in _FILES:
        split = _SPLIT_ALIASES.get(key, {}).get(split, split)
        files = _local_files(key, split, cfg.path, data_dir)
        source = itertools.chain.from_iterable(_local(key, s, f, errors) for s, f in files)
    elif "/" in name:
        source = _load_hub(name, split, cfg.fields, cfg.task, errors)
    else:
        raise ConfigError(
            f"dataset.name: unknown dataset {name!r}; expected builtin, jsonl, gsm8k, svamp, strategyqa, "
            "logiqa, or a Hugging Face hub name (owner/name)"
        )
    stop = None if cfg.limit is None else cfg.offset + cfg.limit
    return itertools.islice(source, cfg.offset, stop)


def load_problems(
    cfg: DatasetSection, *, data_dir: Path | None = None, errors: Errors = None
) -> list[Problem]:
    """The problems of a ``[dataset]`` config section (see the module docstring)."""
    return list(iter_problems(cfg, data_dir=data_dir, errors=errors))
