"""Evaluation: grading identical to the engine's, Wilson intervals, batched generation, report."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
answers = pytest.importorskip("fairdistill.engine.fair.answers")


from fairdistill.engine.rundir.schema import Problem  # noqa: E402
from fairdistill.trainer.evaluate import HFGenerator, accuracy, evaluate, grade, parse_adapters, wilson  # noqa: E402
from fairdistill.trainer.model import save_tiny_student  # noqa: E402

torch.set_num_threads(2)

NUM = Problem(id="n1", question="?", answer="18", task="numeric")
YES = Problem(id="y1", question="?", answer="yes", task="yesno")
CHOICE = Problem(id="c1", question="?", answer="B", task="choice", options=("red", "blue", "green", "gold"))
CASES = [
    ("She has 9 + 9 = 18 apples.\nThe answer is 18.", NUM),
    ("The answer is $18.00", NUM),
    ("So 3 * 6 = 18 apples in total", NUM),  # flexible only
    ("The answer is 1,8.", NUM),
    ("First 18, then 20 left.", NUM),
    ("", NUM),
    ("Yes. Birds fly.\nThe answer is yes.", YES),
    ("no way, that is false", YES),
    ("The answer is B.", CHOICE),
    ("I pick blue", CHOICE),
    ("(C) green", CHOICE),
]


@pytest.mark.parametrize(("text", "problem"), CASES)
def test_grading_is_the_engines(text, problem):
    row = grade(text, problem)
    for mode in ("strict", "flexible"):
        pred = answers.extract_answer(text, problem.task, mode=mode, options=problem.options)
        assert row[mode] == pred
        assert row[f"{mode}_ok"] == answers.is_correct(pred, problem.answer, problem.task)


def test_numbers_are_compared_numerically():
    assert grade("The answer is 18.0", NUM)["strict_ok"]
    assert grade("The answer is $18.00", NUM)["strict_ok"]
    assert not grade("So 3 * 6 = 18 apples", NUM)["strict_ok"] and grade("So 3 * 6 = 18", NUM)["flexible_ok"]


def test_wilson_interval_reference_values():
    # Reference: Wilson (1927) score interval, z = 1.96 (e.g. statsmodels proportion_confint method="wilson")
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    acc = accuracy([{"strict_ok": True}, {"strict_ok": False}], "strict")
    assert acc["accuracy"] == 0.5 and acc["n"] == 2 and acc["ci_low"] < 0.5 < acc["ci_high"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_student(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory) -> str:
    from peft import LoraConfig, get_peft_model

    from fairdistill.trainer.model import load_student

    model, _ = load_student(tiny_model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return str(folder)


def test_left_padded_batches_generate_what_single_prompts_do(tiny_model):
    gen = HFGenerator(tiny_model, {}, device="cpu")
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "A much longer question about apples and oranges, step by step?"}],
        [{"role": "user", "content": "What is 2 + 2?"}],
    ]
    batched, _ = gen.generate("base", chats, max_new_tokens=6, batch_size=3)
    single = [gen.generate("base", [c], max_new_tokens=6, batch_size=1)[0][0] for c in chats]
    assert batched == single


def test_evaluate_writes_report_for_base_and_adapters(tiny_model, tiny_adapter, tmp_path):
    problems = {
        "mini": [
            Problem(id="a", question="What is 2 + 2?", answer="4", task="numeric"),
            Problem(id="b", question="Is the sky green?", answer="no", task="yesno"),
        ]
    }
    summary = evaluate(
        tiny_model,
        {"lora": tiny_adapter},
        problems,
        max_new_tokens=5,
        batch_size=2,
        out=tmp_path,
        backend="transformers",
        device="cpu",
    )
    res = summary["results"]
    assert set(res) == {"base", "lora"} and res["base"]["mini"]["strict"]["n"] == 2
    for name in (
        "report.md",
        "accuracy.png",
        "results.json",
        "wrong/base__mini.jsonl",
        "wrong/lora__mini.jsonl",
    ):
        assert (tmp_path / name).exists(), name
    wrong = (tmp_path / "wrong/lora__mini.jsonl").read_text().splitlines()
    assert len(wrong) == 2 - res["lora"]["mini"]["strict"]["correct"]
    assert {"id", "gold", "strict", "flexible", "text"} <= set(json.loads(wrong[0]))
    assert "| lora |" in (tmp_path / "report.md").read_text()


def test_parse_adapters_names_and_checks(tmp_path):
    (tmp_path / "run1" / "adapter").mkdir(parents=True)
    assert parse_adapters([f"fair={tmp_path}/run1/adapter"]) == {"fair": f"{tmp_path}/run1/adapter"}
    assert parse_adapters([f"{tmp_path}/run1/adapter"]) == {"run1": f"{tmp_path}/run1/adapter"}
    with pytest.raises(FileNotFoundError):
        parse_adapters([f"x={tmp_path}/missing"])


def test_base_and_adapter_outputs_differ_and_switching_back_restores_base(tiny_model, tiny_adapter):
    """One generator, adapters switched in place: the LoRA text differs from the base text, and
    'base' after 'lora' is again exactly what a generator without adapters produces."""
    chats = [[{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Name a colour.", "Count to 3.")]
    plain, _ = HFGenerator(tiny_model, {}, device="cpu").generate("base", chats, 8, 3)
    gen = HFGenerator(tiny_model, {"lora": tiny_adapter}, device="cpu")
    base, _ = gen.generate("base", chats, 8, 3)
    lora, _ = gen.generate("lora", chats, 8, 3)
    base_again, _ = gen.generate("base", chats, 8, 3)
    assert base == plain == base_again
    assert all(b != a for b, a in zip(base, lora, strict=True))


# -- leak refusal ---------------------------------------------------------------------------------


def _trained_on(folder, ids: list[str]) -> str:
    from fairdistill.engine.fair.splits import ids_digest, write_training_record

    folder.mkdir(parents=True, exist_ok=True)
    write_training_record(folder, {"runs": [], "problem_ids": ids, "problem_ids_sha256": ids_digest(ids)})
    return str(folder)


def test_eval_refuses_to_score_training_questions(datasets_dir, tmp_path, capsys):
    from fairdistill.engine.cli import main
    from fairdistill.engine.config import DatasetSection
    from fairdistill.engine.fair.datasets import load_problems

    test = load_problems(DatasetSection(name="svamp", split="test", limit=5), data_dir=datasets_dir)
    adapter = _trained_on(tmp_path / "leaky" / "adapter", [p.id for p in test[:3]])
    (tmp_path / "leaky" / "adapter" / "adapter_config.json").write_text('{"r": 8}')  # (checked first)
    code = main(["eval", "--adapter", f"leaky={adapter}", "--datasets", "svamp", "--split", "test",
                 "--limit", "5", "--out", str(tmp_path / "eval")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    print("\n" + err[-1])
    assert code == 2
    assert err[-1].startswith("fair: config error: eval: refusing to score: leaky was trained on 3 of the 5")
    assert "svamp/test" in err[-1] and "--allow-overlap" in err[-1]
    assert not (tmp_path / "eval").exists()  # refused before any generation


def test_allow_overlap_scores_and_says_so_in_bold(datasets_dir, tiny_model, tiny_adapter, tmp_path):
    import shutil

    from fairdistill.engine.cli import main
    from fairdistill.engine.config import DatasetSection
    from fairdistill.engine.fair.datasets import load_problems

    test = load_problems(DatasetSection(name="svamp", split="test", limit=2), data_dir=datasets_dir)
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    _trained_on(adapter, [test[0].id])
    code = main(["eval", "--model", tiny_model, "--adapter", f"leaky={adapter}", "--datasets", "svamp",
                 "--limit", "2", "--max-new-tokens", "3", "--backend", "transformers", "--no-progress",
                 "--allow-overlap", "--out", str(tmp_path / "eval")])  # fmt: skip
    assert code == 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert (
        "**Scored on training questions (--allow-overlap): leaky was trained on 1 of the 2 svamp/test"
        in report
    )


def test_readme_workflow_is_leak_free(datasets_dir):
    """examples/committee.toml collects mistakes on GSM8K train; `fair eval` scores test by default."""
    from fairdistill.engine.cli import build_parser
    from fairdistill.engine.config import DatasetSection, load_config
    from fairdistill.engine.fair.datasets import load_problems
    from fairdistill.engine.fair.splits import overlaps
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "examples" / "committee.toml")
    assert cfg.dataset.split == "train" and DatasetSection().split == "train"
    trained = load_problems(cfg.dataset, data_dir=datasets_dir)
    assert len(trained) == 7473
    split = build_parser().parse_args(["eval", "--datasets", "gsm8k"]).split
    scored = load_problems(DatasetSection(name="gsm8k", split=split), data_dir=datasets_dir)
    record = {"problem_ids": [p.id for p in trained]}
    assert overlaps(record, scored, split) == {}
    assert {p.question for p in trained}.isdisjoint({p.question for p in scored})
