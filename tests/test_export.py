"""``fair export``: every format written from a small run directory, re-read and checked."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from fairdistill.engine.cli import main as fair
from fairdistill.engine.errors import ConfigError
from fairdistill.engine.rundir.export import FORMATS, export
from fairdistill.engine.rundir.schema import Msg, Sample, Score
from fairdistill.engine.rundir.store import RunStore

SYSTEM = "You are a careful problem solver."


def _sample(pid: str, task: str, teacher: str) -> Sample:
    user = f"Problem {pid}: what is 2 + {pid[-1]}?"
    if task == "mistake":
        user += '\n\nHere is an incorrect answer:\n"""\n7\n"""\nExplain what is wrong, then solve it.'
    return Sample(
        id=f"{pid}/sample/{task}/{teacher}",
        problem_id=pid,
        task=task,
        messages=[Msg("system", SYSTEM), Msg("user", user)],
        response=f"{teacher} reasons step by step.\nThe answer is {2 + int(pid[-1])}.",
        teacher=teacher,
        scores=[Score("other", 4)],
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    store = RunStore(root).open(["samples"])
    for i in range(3):
        store.write("samples", _sample(f"p{i}", "rationale", "gpt"))
    for i in range(2):
        store.write("samples", _sample(f"p{i}", "mistake", "claude"))
    store.close("done")
    # a second writer's shard with one new sample and one duplicate id
    other = RunStore(root, writer="w1").open(["samples"])
    other.write("samples", _sample("p9", "mistake", "gemini"))
    other._ids["samples"].discard("p0/sample/rationale/gpt")
    other.write("samples", _sample("p0", "rationale", "gpt"))
    other.close("done")
    return root


def _jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def test_trl_prompt_completion_loads_with_datasets(run_dir: Path, tmp_path: Path):
    result = export(run_dir, "trl", tmp_path / "trl")
    out = Path(result["out"])
    assert result["files"] == {"rationale.jsonl": 3, "mistake.jsonl": 3, "all.jsonl": 6}
    rows = _jsonl(out / "all.jsonl")
    assert len({r["id"] for r in rows}) == 6  # the duplicate id is exported once
    for r in rows:
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert r["completion"] == [{"role": "assistant", "content": r["completion"][0]["content"]}]
        assert r["task"] in ("rationale", "mistake")
    assert {r["task"] for r in _jsonl(out / "mistake.jsonl")} == {"mistake"}

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(out / "all.jsonl"), split="train")
    assert ds.num_rows == 6
    assert {"prompt", "completion", "task", "id"} <= set(ds.column_names)
    assert ds[0]["completion"][0]["role"] == "assistant"


def test_sharegpt(run_dir: Path, tmp_path: Path):
    out = Path(export(run_dir, "sharegpt", tmp_path / "sg")["out"])
    rows = _jsonl(out / "rationale.jsonl")
    assert len(rows) == 3
    for r in rows:
        assert [t["from"] for t in r["conversations"]] == ["system", "human", "gpt"]
        assert r["conversations"][0]["value"] == SYSTEM
        assert r["conversations"][-1]["value"].startswith("gpt reasons")
        assert r["task"] == "rationale"


def test_llamafactory_files_and_registry(run_dir: Path, tmp_path: Path):
    data = tmp_path / "LLaMA-Factory" / "data"
    data.mkdir(parents=True)
    (data / "dataset_info.json").write_text(
        json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}})
    )
    result = export(run_dir, "llamafactory", data)
    info = json.loads((data / "dataset_info.json").read_text())
    assert "alpaca_en_demo" in info  # existing entries kept
    for split, n in (("rationale", 3), ("mistake", 3), ("all", 6)):
        entry = info[f"fair_{split}"]
        assert entry["formatting"] == "sharegpt"
        assert entry["columns"] == {"messages": "conversations", "system": "system"}
        assert entry["tags"] == {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
        }
        rows = json.loads((data / entry["file_name"]).read_text())  # a JSON array
        assert len(rows) == n == result["files"][entry["file_name"]]
        for r in rows:
            turns = r["conversations"]
            # LLaMA-Factory: human on odd positions, gpt on even, ending with gpt
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert r["system"] == SYSTEM


def test_axolotl_messages_and_yaml(run_dir: Path, tmp_path: Path):
    out = Path(export(run_dir, "axolotl", tmp_path / "ax")["out"])
    rows = _jsonl(out / "all.jsonl")
    assert len(rows) == 6
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((out / "axolotl.yaml").read_text())
    (entry,) = cfg["datasets"]
    assert entry["type"] == "chat_template"
    assert entry["roles_to_train"] == ["assistant"]
    assert entry["field_messages"] == "messages"
    assert entry["ds_type"] == "json"
    assert Path(entry["path"]) == (out / "all.jsonl").resolve()


def test_cli_and_errors(run_dir: Path, tmp_path: Path, capsys):
    assert fair(["export", str(run_dir), "--format", "sharegpt"]) == 0
    assert (run_dir / "export" / "sharegpt" / "all.jsonl").exists()
    assert "6 samples" in capsys.readouterr().err
    assert fair(["export", str(tmp_path / "missing"), "--format", "trl"]) == 2
    with pytest.raises(ConfigError):
        export(run_dir, "csv")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_run_writes_empty_files(tmp_path: Path, fmt: str):
    root = tmp_path / "empty"
    RunStore(root).open(["samples"]).close("done")
    result = export(root, fmt)
    assert result["samples"] == 0
    for name in result["files"]:
        assert (Path(result["out"]) / name).exists()
    if fmt == "llamafactory":
        assert json.loads((Path(result["out"]) / "fair_all.json").read_text()) == []
