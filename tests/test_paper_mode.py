"""Paper mode end to end against the simulator; error types; calibrated aggregation; manifests."""

from __future__ import annotations

import msgspec

from fairdistill.engine.config import RunConfig, convert_config
from fairdistill.engine.fair.errortypes import TYPES, majority, parse_error_type, strip_tag
from fairdistill.engine.fair.report import summarize, write_report
from fairdistill.engine.fair.splits import ids_digest
from fairdistill.engine.rundir.schema import Sample
from fairdistill.engine.rundir.store import iter_raw, iter_records, read_manifest
from fairdistill.engine.sim import start_sim
from tests.test_pipeline import config, problems, profile, run


def paper_config(base_url: str) -> RunConfig:
    raw = msgspec.to_builtins(config(base_url))
    raw["prompts"] = "paper"
    raw["student"].update(attempts=1, temperature=0.3, top_p=0.9)
    raw["review"] = {"gold_check": "off"}
    raw["samples"] = {"policy": "paper", "answer_line": False}
    for ep in raw["endpoints"].values():
        ep.pop("name", None)
    return convert_config(raw, RunConfig, source="test")


async def test_paper_mode_run(tmp_path):
    probs = problems(30)
    gold = {p.id: p.answer for p in probs}
    async with start_sim(profile(student_skill=0.2), problems=probs) as sim:
        summary = await run(paper_config(sim.base_url), tmp_path, probs)
    assert summary["status"] == "done"
    rationales = list(iter_raw(tmp_path, "rationales"))
    assert rationales and all(r["status"] != "rejected_gold" for r in rationales)  # gold check off
    accepted = {r["problem_id"] for r in rationales if r["accepted"]}
    samples = list(iter_records(tmp_path, "samples", Sample))
    assert samples
    assert {s.problem_id for s in samples} <= accepted  # no accepted rationale -> no samples
    for s in samples:
        user = s.messages[-1].content
        if s.task == "mistake":  # Question / Student's Answer / Hint with the gold
            assert "Question: " in user and "Student's Answer: " in user
            assert user.endswith(f"Hint: The correct answer should be {gold[s.problem_id]}.")
            assert s.error_type in TYPES and not s.response.startswith("[")  # tag stripped
        else:  # the bare question, no gold
            assert user.endswith("Answer: Let's think step by step.") and "Hint" not in user
            assert not s.answer_line_added
    feedback = list(iter_raw(tmp_path, "feedback"))
    assert feedback and all(f["error_type"] in TYPES for f in feedback)  # the simulator tags
    report = write_report(tmp_path).read_text()
    assert "## Judge quality" in report and "## Student error types" in report
    manifest = read_manifest(tmp_path)
    done = [r["id"] for r in iter_raw(tmp_path, "problems")]
    assert manifest["dataset"] == "builtin" and manifest["split"] == "train"  # the section's defaults
    assert manifest["problem_ids_sha256"] == ids_digest(done) and manifest["problem_ids_n"] == 30


async def test_calibrated_aggregation_weighs_a_harsh_reviewer_like_a_lenient_one(tmp_path):
    probs = problems(30)
    async with start_sim(profile(student_skill=0.2), problems=probs) as sim:
        base = await run(config(sim.base_url, review={"early_stop": False}), tmp_path / "mean", probs)
        cal = await run(config(sim.base_url, review={"aggregation": "calibrated"}), tmp_path / "cal", probs)
    assert base["status"] == cal["status"] == "done"
    s = summarize(tmp_path / "cal")
    judges = s["judges"]["reviewers"]
    assert judges["t-harsh"]["mean_score"] < judges["t-good"]["mean_score"]  # the sim's leniency
    cal_means = [r["mean_score"] for r in iter_raw(tmp_path / "cal", "rationales") if r["scores"]]
    assert cal_means and any(m != round(m * 2) / 2 for m in cal_means)  # standardised, not raw means


def test_error_type_parsing():
    assert parse_error_type("[arithmetic]\nThe student added wrong.") == "arithmetic"
    assert parse_error_type("Error type: [ Wrong-Plan ]") == "wrong-plan"
    assert parse_error_type("The student slipped. [4]") == "unknown"
    assert strip_tag("[arithmetic]\nStep 1.\nThe answer is 3.") == "Step 1.\nThe answer is 3."
    assert strip_tag("[misread] The question asks for pens.") == "The question asks for pens."
    assert strip_tag("No tag here.") == "No tag here."
    assert majority(["arithmetic", "misread", "arithmetic"]) == "arithmetic"
    assert majority(["misread", "arithmetic"]) == "misread"  # tie: taxonomy order
    assert majority(["unknown", "unknown"]) == "unknown"


def test_answer_line_is_appended_only_when_missing():
    from fairdistill.engine.fair.stages.samples import with_answer_line
    from fairdistill.engine.rundir.schema import Problem

    p = Problem(id="q", question="?", answer="52", task="numeric")
    free = "26 necklaces * 2 beads = 52 beads.\nSo Emily used a total of 52 beads for her 44 friends."
    text, added = with_answer_line(free, "52", p)
    assert added and text == free + "\nThe answer is 52."
    assert with_answer_line(text, "52", p) == (text, False)  # already has one
    assert with_answer_line("No number here.", None, p) == ("No number here.", False)


def test_states_answer():
    from fairdistill.engine.fair.answers import states_answer

    assert states_answer("So 3 * 6 = 18 apples.", "18", "numeric")
    assert not states_answer("So 3 * 6 = 19 apples.", "18", "numeric")
    assert states_answer("Birds can fly, so yes.", "yes", "yesno")
    assert states_answer("The answer is (B).", "B", "choice") and not states_answer("Maybe C.", "B", "choice")
