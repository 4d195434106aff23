"""Dataset loaders: counts, ids, canonical golds, splits, bad input, the built-in set, the hub path."""

from __future__ import annotations

import json
import sys
import types
from fractions import Fraction

import pytest

from fairdistill.engine.config import DatasetSection
from fairdistill.engine.errors import ConfigError, InputError
from fairdistill.engine.fair import datasets
from fairdistill.engine.fair.answers import normalize_gold
from fairdistill.engine.fair.datasets import (
    load_builtin,
    load_gsm8k,
    load_jsonl,
    load_logiqa,
    load_problems,
    load_svamp,
    svamp_split,
)


def cfg(**kw) -> DatasetSection:
    return DatasetSection(**kw)


# --------------------------------------------------------------------------------------------- reference data


def test_gsm8k(datasets_dir):
    problems = load_problems(cfg(name="gsm8k", split="test"), data_dir=datasets_dir)
    assert len(problems) == 1319
    first = problems[0]
    assert (first.id, first.answer, first.task, first.dataset) == (
        "gsm8k-test-00000",
        "18",
        "numeric",
        "gsm8k",
    )
    assert first.question.startswith("Janet")
    assert len({p.id for p in problems}) == 1319
    for p in problems:
        assert normalize_gold(p.answer, "numeric") == p.answer  # canonical: no commas, no ".0"


def test_offset_and_limit_keep_ids(datasets_dir):
    window = load_problems(cfg(name="gsm8k", split="test", offset=42, limit=3), data_dir=datasets_dir)
    assert [p.id for p in window] == ["gsm8k-test-00042", "gsm8k-test-00043", "gsm8k-test-00044"]
    assert load_problems(cfg(name="gsm8k", split="test", offset=1319), data_dir=datasets_dir) == []
    assert load_problems(cfg(name="gsm8k", limit=0), data_dir=datasets_dir) == []
    with pytest.raises(ConfigError, match="offset"):
        load_problems(cfg(name="gsm8k", offset=-1), data_dir=datasets_dir)


def test_svamp(datasets_dir):
    every = load_problems(cfg(name="svamp", split="all"), data_dir=datasets_dir)
    train = load_problems(cfg(name="svamp", split="train"), data_dir=datasets_dir)
    test = load_problems(cfg(name="svamp", split="test"), data_dir=datasets_dir)
    assert (len(every), len(train), len(test)) == (1000, 700, 300)
    assert {p.id for p in train} | {p.id for p in test} == {p.id for p in every}
    assert not {p.id for p in train} & {p.id for p in test}
    first = every[0]
    assert first.id == "svamp-chal-1"
    assert first.answer == "51"  # not "51.0"
    assert first.question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    raw = json.loads((datasets_dir / "svamp" / "SVAMP.json").read_text())
    for p, r in zip(every, raw, strict=True):
        assert Fraction(p.answer) == Fraction(repr(r["Answer"]))
    # the seeded split is deterministic and kept in file order
    assert svamp_split(1000, "train") == svamp_split(1000, "train")
    assert svamp_split(1000, "test") == sorted(svamp_split(1000, "test"))
    with pytest.raises(ConfigError, match="split"):
        load_problems(cfg(name="svamp", split="dev"), data_dir=datasets_dir)


def test_strategyqa(datasets_dir):
    problems = load_problems(cfg(name="strategyqa", split="dev"), data_dir=datasets_dir)
    assert len(problems) == 229
    assert problems[0].id == "strategyqa-e0044a7b4d146d611e73"
    assert problems[0].answer == "no"
    assert {p.answer for p in problems} == {"yes", "no"}
    assert all(p.task == "yesno" for p in problems)
    assert load_problems(cfg(name="strategyqa", split="validation"), data_dir=datasets_dir) == problems
    # StrategyQA's test split is unlabelled: "test" is the labelled dev split when no test file exists
    assert load_problems(cfg(name="strategyqa", split="test"), data_dir=datasets_dir) == problems
    with pytest.raises(ConfigError, match="split 'train'"):
        load_problems(cfg(name="strategyqa", split="train"), data_dir=datasets_dir)


def test_split_all(datasets_dir):
    """split = "all": every split file present (what the simulator asks for)."""
    sizes = {"gsm8k": 1319 + 7473, "svamp": 1000, "strategyqa": 229, "logiqa": 1302}
    for name, size in sizes.items():
        problems = load_problems(cfg(name=name, split="all"), data_dir=datasets_dir)
        assert len(problems) == len({p.id for p in problems}) == size, name
    logiqa = load_problems(cfg(name="logiqa", split="all"), data_dir=datasets_dir)
    assert logiqa[0].id == "logiqa-eval-00000" and logiqa[-1].id == "logiqa-test-00650"


def test_logiqa(datasets_dir):
    for split, name in (("test", "Test.txt"), ("eval", "Eval.txt")):
        problems = load_problems(cfg(name="logiqa", split=split), data_dir=datasets_dir)
        assert len(problems) == 651
        assert problems[0].id == f"logiqa-{split}-00000"
        for p in problems:
            assert p.task == "choice" and p.answer in "ABCD" and len(p.answer) == 1
            assert p.context and p.question
            assert p.options is not None and len(p.options) == 4 and all(p.options)
        raw = (datasets_dir / "logiqa" / name).read_text().splitlines()
        assert [p.answer.lower() for p in problems] == [raw[1 + 8 * i].strip() for i in range(651)]
    test = load_problems(cfg(name="logiqa", split="test"), data_dir=datasets_dir)
    first = test[0]
    assert first.options[0] == "Civic Park is north of the administrative service area"  # "A." stripped
    # a block listing its options "A. C. B. D.": the gold letter refers to the label
    valves = test[108]
    assert valves.answer == "B"
    assert valves.options[1] == "No.2 valve and No.3 valve."
    assert (
        load_problems(cfg(name="logiqa", split="validation"), data_dir=datasets_dir)[0].id
        == "logiqa-eval-00000"
    )


def test_path_forms(datasets_dir, monkeypatch):
    """dataset.path may be the file, the dataset's folder, or the folder holding it; else $FAIR_DATA_DIR."""
    by_file = load_problems(cfg(name="gsm8k", path=str(datasets_dir / "gsm8k" / "test.jsonl"), limit=2))
    by_folder = load_problems(cfg(name="gsm8k", split="test", path=str(datasets_dir / "gsm8k"), limit=2))
    by_parent = load_problems(cfg(name="gsm8k", split="test", path=str(datasets_dir), limit=2))
    monkeypatch.setenv("FAIR_DATA_DIR", str(datasets_dir))
    assert datasets.default_data_dir() == datasets_dir
    by_env = load_problems(cfg(name="gsm8k", split="test", limit=2))
    assert by_file == by_folder == by_parent == by_env
    assert by_file[0].id == "gsm8k-test-00000"
    # a file named after a split names the ids, whatever dataset.split says
    named = load_problems(
        cfg(name="gsm8k", split="train", path=str(datasets_dir / "gsm8k" / "test.jsonl"), limit=1)
    )
    assert named[0].id == "gsm8k-test-00000"


def test_missing_data_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"dataset\.path"):
        load_problems(cfg(name="gsm8k", path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="openai/gsm8k"):  # points at the hub name
        load_problems(cfg(name="gsm8k"), data_dir=tmp_path)
    monkeypatch.setattr(datasets, "default_data_dir", lambda: None)
    with pytest.raises(ConfigError, match="FAIR_DATA_DIR"):
        load_problems(cfg(name="svamp"))
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_problems(cfg(name="mnist"))
    with pytest.raises(ConfigError, match=r"dataset\.path"):
        load_problems(cfg(name="jsonl"))


# --------------------------------------------------------------------------------------------- bad input


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_field_mapping(tmp_path):
    f = write(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"qid": "q1", "text": "2 + 2?", "label": 4}),
            "",
            json.dumps(
                {"qid": "q2", "text": "Is ice cold?", "label": 4.0, "passage": "Ice is frozen water."}
            ),
        ],
    )
    fields = {"id": "qid", "question": "text", "answer": "label", "context": "passage"}
    problems = load_jsonl(f, fields, "numeric")
    assert [(p.id, p.answer, p.dataset, p.context) for p in problems] == [
        ("q1", "4", "mine", None),
        ("q2", "4", "mine", "Ice is frozen water."),
    ]
    via_cfg = load_problems(cfg(name="jsonl", path=str(f), fields=fields, task="numeric"))
    assert via_cfg == problems


def test_jsonl_gsm8k_style_gold(tmp_path):
    f = write(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": "2 + 2 = 4\n#### 4"})])
    assert load_jsonl(f, task="numeric")[0].answer == "4"


def test_jsonl_choice_and_default_ids(tmp_path):
    f = write(
        tmp_path / "mc.jsonl",
        [
            json.dumps({"question": "Pick", "options": ["A. one", "B. two", "three"], "answer": 1}),
            json.dumps({"question": "Pick", "options": "A. x\nB. y", "answer": "a"}),
        ],
    )
    p1, p2 = load_jsonl(f, task="choice")
    assert (p1.id, p1.answer, p1.options) == ("mc-00000", "B", ("one", "two", "three"))
    assert (p2.id, p2.answer, p2.options) == ("mc-00001", "A", ("x", "y"))
    write(f, [json.dumps({"question": "Pick", "options": ["x", "y"], "answer": "C"})])
    with pytest.raises(InputError, match="only 2 options"):
        load_jsonl(f, task="choice")


def test_bad_lines_are_reported_with_file_line_and_field(tmp_path):
    f = write(
        tmp_path / "bad.jsonl",
        [
            json.dumps({"id": "ok1", "question": "1 + 1?", "answer": "2"}),
            '{"id": "broken", "question": ',  # line 2: malformed JSON
            json.dumps({"id": "noq", "answer": "3"}),  # line 3: no question
            json.dumps({"id": "badans", "question": "?", "answer": "many"}),  # line 4: not a number
            json.dumps({"id": "ok1", "question": "again", "answer": "5"}),  # line 5: duplicate id
            json.dumps(["not", "an", "object"]),  # line 6
            json.dumps({"id": "ok2", "question": "2 + 2?", "answer": "1,000"}),
        ],
    )
    errors: list[InputError] = []
    problems = load_jsonl(f, task="numeric", errors=errors)
    assert [p.id for p in problems] == ["ok1", "ok2"]
    assert problems[1].answer == "1000"
    messages = [str(e) for e in errors]
    assert len(messages) == 5
    assert messages[0].startswith(f"{f}:2: malformed JSON")
    assert messages[1].startswith(f"{f}:3: field 'question'") and "missing" in messages[1]
    assert messages[2].startswith(f"{f}:4: field 'answer'")
    assert messages[3].startswith(f"{f}:5: field 'id'") and "duplicate" in messages[3]
    assert messages[4].startswith(f"{f}:6:")
    assert all(isinstance(e, InputError) for e in errors)
    # without an errors list the first bad line raises
    with pytest.raises(InputError, match=r"bad\.jsonl:2: malformed JSON"):
        load_jsonl(f, task="numeric")
    # through the config entry point, with the mapped field named
    errors = []
    via_cfg = load_problems(
        cfg(name="jsonl", path=str(f), task="numeric", fields={"question": "question"}), errors=errors
    )
    assert len(via_cfg) == 2 and len(errors) == 5


def test_mapped_field_is_named(tmp_path):
    f = write(tmp_path / "m.jsonl", [json.dumps({"q": "2 + 2?"})])
    with pytest.raises(InputError, match=r"m\.jsonl:1: field 'label' \(answer\): missing"):
        load_jsonl(f, {"question": "q", "answer": "label"}, "numeric")


def test_task_per_line_or_configured(tmp_path):
    f = write(tmp_path / "t.jsonl", [json.dumps({"question": "?", "answer": "yes", "task": "essay"})])
    with pytest.raises(InputError, match="field 'task'"):
        load_jsonl(f)
    with pytest.raises(ConfigError, match=r"dataset\.task"):
        load_jsonl(f, task="essay")
    with pytest.raises(ConfigError, match=r"dataset\.fields"):
        load_jsonl(f, {"prompt": "question"}, "yesno")
    assert load_jsonl(f, task="yesno")[0].answer == "yes"


def test_svamp_bad_item(tmp_path):
    items = [
        {"ID": "chal-1", "Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3.0},
        {"ID": "chal-2", "Body": "No question here.", "Answer": 1.0},
        {"ID": "chal-3", "Body": "Sue has 2.", "Question": "How many?", "Answer": "two"},
    ]
    f = tmp_path / "SVAMP.json"
    f.write_text(json.dumps(items, indent=4))
    errors: list[InputError] = []
    problems = load_svamp(f, errors=errors)
    assert [p.id for p in problems] == ["svamp-chal-1"]
    assert str(errors[0]).startswith(f"{f}:8: field 'Question': missing")  # the line the item starts on
    assert str(errors[1]).startswith(f"{f}:13: field 'Answer'")
    f.write_text('[{"ID": "chal-1", "Body": ')
    errors = []
    assert load_svamp(f, errors=errors) == []
    assert "malformed JSON" in str(errors[0])


def test_gsm8k_missing_final_line(tmp_path):
    f = write(
        tmp_path / "test.jsonl",
        [
            json.dumps({"question": "q", "answer": "no final line"}),
            json.dumps({"question": "q", "answer": "#### 7"}),
        ],
    )
    errors: list[InputError] = []
    problems = load_gsm8k(f, errors=errors)
    assert [(p.id, p.answer) for p in problems] == [("gsm8k-test-00001", "7")]
    assert "field 'answer'" in str(errors[0]) and "####" in str(errors[0])


def test_logiqa_broken_block_resyncs(tmp_path):
    good = ["", "b", "Context one.", "Question one?", "A.x", "B.y", "C.z", "D.w"]
    broken = ["", "c", "Context two.", "Question two?", "A.x", "B.y"]  # two options missing
    f = write(tmp_path / "Test.txt", good + broken + good)
    errors: list[InputError] = []
    problems = load_logiqa(f, errors=errors)
    assert [(p.id, p.answer) for p in problems] == [("logiqa-test-00000", "B"), ("logiqa-test-00002", "B")]
    assert str(errors[0]).startswith(f"{f}:10:")


# --------------------------------------------------------------------------------------------- built-in set


def test_builtin_set():
    problems = load_builtin()
    assert len(problems) >= 80
    assert len({p.id for p in problems}) == len(problems)
    tasks = [p.task for p in problems]
    assert tasks.count("yesno") >= 10 and tasks.count("choice") >= 10 and tasks.count("numeric") >= 55
    assert load_problems(cfg()) == problems  # the default dataset
    for p in problems:
        assert normalize_gold(p.answer, p.task) == p.answer
        if p.task == "choice":
            assert p.options is not None and len(p.options) == 4


def test_builtin_golds_are_computed():
    """Every built-in problem carries the arithmetic that answers it; the gold must equal it."""
    for line in datasets.BUILTIN.read_text().splitlines():
        rec = json.loads(line)
        value = eval(rec["equation"], {"__builtins__": {}})  # trusted: our own file
        if rec["task"] == "numeric":
            assert Fraction(rec["answer"]) == Fraction(str(value)), rec["id"]
        elif rec["task"] == "yesno":
            assert rec["answer"] == ("yes" if value else "no"), rec["id"]
        else:
            index = "ABCD".index(rec["answer"])
            assert Fraction(rec["options"][index]) == Fraction(str(value)), rec["id"]
            assert sum(Fraction(o) == Fraction(str(value)) for o in rec["options"]) == 1, rec["id"]


# --------------------------------------------------------------------------------------------- hub path


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in ``datasets`` module: load_dataset answers from a dict, or fails like offline."""
    tables: dict = {}
    calls: list = []

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        if (name, split) not in tables:
            raise ConnectionError(f"Couldn't reach {name!r} on the Hub")
        return tables[(name, split)]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return tables, calls


def test_hub_gsm8k_and_logiqa(fake_hub):
    tables, calls = fake_hub
    tables[("openai/gsm8k", "test")] = [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]
    tables[("lucasmccabe/logiqa", "validation")] = [
        {"context": "C", "query": "Q?", "options": ["a", "b", "c", "d"], "correct_option": 2}
    ]
    (g,) = load_problems(cfg(name="openai/gsm8k", split="test"))
    assert (g.id, g.answer) == ("gsm8k-test-00000", "2")  # same ids as the local copy
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    (lq,) = load_problems(cfg(name="lucasmccabe/logiqa", split="eval"))
    assert (lq.id, lq.answer, lq.options, lq.context) == ("logiqa-eval-00000", "C", ("a", "b", "c", "d"), "C")


def test_hub_generic_needs_task(fake_hub):
    tables, _ = fake_hub
    tables[("someone/qa", "test")] = [{"prompt": "Is it?", "label": True}]
    with pytest.raises(ConfigError, match=r"dataset\.task"):
        load_problems(cfg(name="someone/qa", split="test"))
    (p,) = load_problems(
        cfg(name="someone/qa", split="test", task="yesno", fields={"question": "prompt", "answer": "label"})
    )
    assert (p.id, p.answer, p.dataset) == ("qa-00000", "yes", "qa")


def test_hub_offline_is_a_clear_config_error(fake_hub):
    with pytest.raises(ConfigError, match=r"could not load 'ChilleD/SVAMP'.*local copy"):
        load_problems(cfg(name="ChilleD/SVAMP"))


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_problems(cfg(name="openai/gsm8k"))
