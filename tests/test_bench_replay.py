"""``fair bench replay-svamp`` end to end on a tiny random Llama: the FAIR pipeline over the paper's
replayed SVAMP texts, three recipes on different sample sets, and a held-out evaluation."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from tests.conftest import missing_data

pytest.importorskip("torch")
pytest.importorskip("peft")

from fairdistill.benchmarks import replay_svamp
from fairdistill.engine.rundir.store import iter_raw
from fairdistill.engine.sim.content import norm
from fairdistill.engine.sim.replay import ReplayData, data_dir


def parse(*argv: str) -> argparse.Namespace:
    """The options as the ``fair bench`` dispatcher builds them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    replay_svamp.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, Path, Path]:
    data = data_dir()
    if data is None or not all((data / f).is_file() for f in replay_svamp.RELEASE_FILES):
        missing_data("FAIR release data absent: set FAIR_DATA_DIR or provide ../shared/datasets")
    try:
        from fairdistill.trainer.model import load_tokenizer

        load_tokenizer()  # the tiny model borrows SmolLM2's tokenizer
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")
    out = tmp_path_factory.mktemp("bench-replay")
    args = parse(
        "--tiny", "--problems", "10", "--steps", "3", "--eval-n", "5", "--teacher", "gemini",
        "--data-dir", str(data), "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    return replay_svamp.run(args), out, data


def test_pipeline_ran_over_the_replayed_committee(bench):
    result, out, _data = bench
    p = result["pipeline"]
    assert p["problems"] == result["train_problems"] == 10 and p["failed_problems"] == 0
    assert p["student_mistakes"] > 0 and p["rationales"] == 3 * p["student_mistakes"]
    assert p["samples_rationale"] > 0 and p["samples_mistake"] > 0
    assert 0 < p["accepted"] < p["rationales"]  # the review (and gold check) rejected some
    assert p["accepted"] + p["rejected_gold"] + p["rejected_review"] <= p["rationales"]
    assert p["rejected_gold_paper_accepts"] <= p["rejected_gold"]
    assert p["rejected_review_paper_accepts"] <= p["rejected_review"]
    assert p["paper_rule_accepts"] <= p["rationales"]
    assert result["exit_code"] == 0
    assert (out / "report.md").read_text().startswith("# replay-svamp")


def test_recipes_train_on_different_sample_sets(bench):
    result, out, _data = bench
    rows = {r["recipe"]: r for r in result["training"]}
    assert list(rows) == list(replay_svamp.RECIPES)

    def samples(name: str) -> list[dict]:
        return list(iter_raw(out / "recipes" / name, "samples"))

    fair, single, no_mistake, paper, paired = (samples(n) for n in replay_svamp.RECIPES)
    committee = list(iter_raw(out / "run", "samples"))
    # (a) FAIR: the committee run's samples exactly, both tasks
    assert {s["id"] for s in fair} == {s["id"] for s in committee}
    assert {s["task"] for s in fair} == {"rationale", "mistake"}
    # (b) one teacher: every rationale it wrote (accepted or not), nothing else
    gemini = [r for r in iter_raw(out / "run", "rationales") if r["teacher"] == "gemini"]
    assert {s["task"] for s in single} == {"rationale"} and {s["teacher"] for s in single} == {"gemini"}
    assert sorted(s["response"] for s in single) == sorted(r["text"] for r in gemini)
    assert any(r["status"] != "accepted" for r in gemini)  # unfiltered: rejected texts included
    # (c) FAIR without mistake learning: the committee's rationale samples only
    assert {s["id"] for s in no_mistake} == {s["id"] for s in committee if s["task"] == "rationale"}
    # every prompt is the rendered solve prompt of the problem, as in the committee run
    prompts = {s["problem_id"]: s["messages"] for s in committee if s["task"] == "rationale"}
    assert all(s["messages"] == prompts[s["problem_id"]] for s in single if s["problem_id"] in prompts)

    # (d) the paper's method: the paper-mode run's samples, paper prompts, no gold check
    assert {s["id"] for s in paper} == {s["id"] for s in iter_raw(out / "run-paper", "samples")}
    assert all(s["prompt_version"] == "paper" for s in paper)
    assert not any(r["status"] == "rejected_gold" for r in iter_raw(out / "run-paper", "rationales"))
    mistake_prompts = [s["messages"][-1]["content"] for s in paper if s["task"] == "mistake"]
    assert mistake_prompts and all("Hint: The correct answer should be" in m for m in mistake_prompts)
    assert rows["fair-paper"]["batching"] == "paired" and rows["fair"]["batching"] == "mixed"
    # (e) fair's data and alpha with paired batches: only the batching differs
    assert [s["id"] for s in paired] == [s["id"] for s in fair]
    assert (
        rows["fair-paired"]["batching"] == "paired" and rows["fair-paired"]["alpha"] == rows["fair"]["alpha"]
    )

    assert rows["fair"]["mistake"] > 0 and rows["single-teacher"]["mistake"] == 0
    assert rows["fair-no-mistake"]["mistake"] == 0
    assert rows["single-teacher"]["teachers"] == "gemini"
    assert rows["single-teacher"]["alpha"] == rows["fair-no-mistake"]["alpha"] == 0.0
    for r in rows.values():  # the same budget for every recipe
        assert r["steps"] == 3 and r["wall_s"] > 0 and r["cpu_s"] > 0 and r["final_loss"] > 0
        assert r["samples"] == r["rationale"] + r["mistake"]


def test_evaluation_is_held_out_with_intervals(bench):
    result, out, data = bench
    rows = {r["model"]: r for r in result["accuracy"]}
    assert set(rows) == {"base", *replay_svamp.RECIPES}
    for r in rows.values():
        assert r["n"] == result["eval_questions"] == 5
        for mode in ("strict", "flexible"):
            assert 0.0 <= r[f"{mode}_lo"] <= r[mode] <= r[f"{mode}_hi"] <= 1.0
    held = [json.loads(line) for line in (out / "eval_problems.jsonl").read_text().splitlines()]
    assert len(held) == 5 and all(h["id"].startswith("svamp-") for h in held)
    replayed = {norm(p.question).lower() for p in ReplayData.load(data).problems()}
    assert len(replayed) == 387
    assert not {norm(h["question"]).lower() for h in held} & replayed


def test_paired_tests_count_the_discordant_questions(bench):
    result, _, _ = bench
    tests = {(t["a"], t["b"]): t for t in result["paired_tests"]}
    assert ("fair-paper", "single-teacher") in tests and ("fair", "single-teacher") in tests
    for t in tests.values():
        assert t["only_a"] + t["only_b"] <= result["eval_questions"] and 0 < t["p"] <= 1
    # exact McNemar reference values (two-sided binomial, p = 1/2)
    assert replay_svamp.mcnemar(0, 0) == 1.0
    assert replay_svamp.mcnemar(0, 5) == pytest.approx(0.0625)
    assert replay_svamp.mcnemar(2, 10) == pytest.approx(0.0386, abs=1e-4)


def test_table_and_json_shape(bench):
    result, _, _ = bench
    text = replay_svamp.table(result)
    assert "single-teacher" in text and "95% CI" in text and "held-out SVAMP" in text
    json.dumps(result)  # what --json prints


def test_missing_data_names_the_path(tmp_path):
    with pytest.raises(replay_svamp.DataMissing, match=re.escape(str(tmp_path / "fair-release"))):
        replay_svamp.run(parse("--tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")))


def test_held_out_excludes_every_training_question(tmp_path):
    data = data_dir()
    if data is None or not (data / replay_svamp.SVAMP_FILE).is_file():
        missing_data("SVAMP absent: set FAIR_DATA_DIR or provide ../shared/datasets")
    train = ReplayData.load(data).problems("svamp")
    pool = replay_svamp.held_out(data, train, None, 0)
    assert len(pool) == 1000 - 387
    assert replay_svamp.held_out(data, train, 40, 0) == replay_svamp.held_out(data, train, 40, 0)
    assert len(replay_svamp.held_out(data, train, 40, 1)) == 40


def test_power_of_the_paired_test():
    # Connor's normal approximation: 50 discordant of 613, difference 10 -> about 2,400 questions
    assert replay_svamp.power(30, 20, 613) == {"mdd80": 0.0323, "n_for_observed": 2404}
    assert replay_svamp.power(10, 10, 613)["n_for_observed"] is None  # no difference to detect
    assert replay_svamp.power(0, 0, 613) == {"mdd80": None, "n_for_observed": None}
    # more questions resolve smaller differences
    assert replay_svamp.power(60, 40, 1226)["mdd80"] < replay_svamp.power(30, 20, 613)["mdd80"]


def test_from_reuses_the_adapters_and_evaluates_more_questions(bench, tmp_path):
    result, out, data = bench
    args = parse(
        "--tiny", "--problems", "10", "--eval-n", "8", "--eval-models", "base,fair",
        "--from", str(out), "--data-dir", str(data), "--out", str(tmp_path), "--device", "cpu",
    )  # fmt: skip
    again = replay_svamp.run(args)
    assert again["reused"] == str(out) and again["eval_questions"] == 8
    assert not (tmp_path / "train").exists() and not (tmp_path / "run").exists()  # nothing retrained
    assert again["training"] == result["training"] and again["pipeline"] == result["pipeline"]
    assert [r["model"] for r in again["accuracy"]] == ["base", "fair"]
    assert [(t["a"], t["b"]) for t in again["paired_tests"]] == [("fair", "base")]
    assert json.loads((tmp_path / "result.json").read_text())["eval_questions"] == 8


def test_from_trains_only_the_recipes_the_source_lacks(bench, tmp_path):
    result, out, data = bench
    older = json.loads((out / "result.json").read_text())
    older["training"] = [r for r in older["training"] if r["recipe"] != "fair-paired"]
    del older["adapters"]["fair-paired"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "result.json").write_text(json.dumps(older))
    args = parse(
        "--tiny", "--problems", "10", "--eval-n", "5", "--eval-models", "base,fair-paired",
        "--from", str(tmp_path / "src"), "--data-dir", str(data), "--out", str(tmp_path / "o"),
        "--device", "cpu",
    )  # fmt: skip
    again = replay_svamp.run(args)
    assert sorted(p.name for p in (tmp_path / "o" / "train").iterdir()) == ["fair-paired"]
    rows = {r["recipe"]: r for r in again["training"]}
    assert list(rows) == list(replay_svamp.RECIPES) and rows["fair-paired"]["steps"] == 3
    assert rows["fair"] == next(r for r in result["training"] if r["recipe"] == "fair")  # reused as is


def test_from_a_folder_without_a_finished_run_is_one_line(tmp_path):
    data = data_dir()
    if data is None or not all((data / f).is_file() for f in replay_svamp.RELEASE_FILES):
        missing_data("FAIR release data absent: set FAIR_DATA_DIR or provide ../shared/datasets")
    args = parse("--tiny", "--from", str(tmp_path), "--data-dir", str(data), "--out", str(tmp_path / "o"))
    with pytest.raises(replay_svamp.UsageError, match=r"no finished run's result\.json"):
        replay_svamp.run(args)
    with pytest.raises(replay_svamp.UsageError, match="unknown"):
        replay_svamp.eval_models("base,fiar")
