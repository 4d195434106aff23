"""``fair bench replay-svamp``: four distillation recipes on the FAIR paper's real SVAMP texts.

1. **Pipeline.** The simulator (``replay-svamp`` profile) replays what real models wrote for the
   387 SVAMP training questions of the FAIR release: GPT-3.5-Turbo, Gemini-1.0-Pro and
   Mixtral-8x7B rationales, mistake explanations and peer scores, and Llama-2-7b-chat's recorded
   wrong answers as the student. One full FAIR job runs over them (student attempt -> grade ->
   rationales + explanations -> gold check -> peer review -> threshold -> samples).
2. **Four recipes, one budget.** SmolLM2-135M-Instruct (LoRA) is trained four times with the
   same optimizer steps, sequence length, lr, seed and LoRA shape:

   - ``fair``: the committee run's samples as written (accepted rationales + mistake
     explanations), the FAIR loss with ``alpha`` (default 0.5); the run's gold check is the
     engine's default (``reject``), ``--gold-check`` changes it;
   - ``single-teacher``: every rationale one teacher (``--teacher``, default ``gpt``) wrote for
     the same problems, with no gold check, no peer review and no mistake learning (``alpha=0``);
   - ``fair-no-mistake``: the committee run's rationale-learning samples only (``alpha=0``);
   - ``fair-paper``: the paper's method: a second committee run in paper mode (``prompts =
     "paper"``, gold as a review hint, no gold check, texts as written, every reviewer asked),
     paired batches (a rationale batch and a mistake batch per step), alpha 0.5, tested with its
     own solve prompt;
   - ``fair-paired``: ``fair``'s samples and alpha with the paper's paired batches, so paired vs
     our one-pass mixed batch is measured on the same data.

   Every recipe sees ``batch_size`` rationale examples per step (``BATCHING``): the mistake task
   is FAIR's extra, not a replacement.

   A ``fair run`` config needs at least two teachers (peer review), so ``single-teacher`` is not
   a second pipeline run: its run directory is built from the committee run's ``rationales``
   records of that teacher (the replayed text is the same a one-teacher run would get), written
   as ordinary ``samples`` records with the same ``solve`` prompt, so the trainer reads all three
   recipes the same way. ``alpha=0`` on the rationale-only recipes keeps their whole loss on the
   rationale term (with ``alpha=0.5`` a rationale-only step would be weighted 0.5); no batch slot
   is spent on mistake samples since there are none in their run directories.
3. **Evaluation.** Base and the three adapters, greedy, on SVAMP questions (``svamp/SVAMP.json``)
   whose text is *not* among the 387 replayed questions (a seeded random subset of ``--eval-n``),
   graded by ``trainer.evaluate`` (strict and flexible, 95 % Wilson intervals), and an exact
   McNemar test between recipes on the same questions (``paired_tests``).

Reports per recipe the samples used, steps, wall and CPU seconds, final losses; per model the
accuracies with intervals; pipeline figures; and writes ``OUT/report.md``. CPU seconds are this
process's ``time.process_time`` (all threads), plus the simulator child's for the pipeline.

Sizes: the defaults are a GPU-size run (all 387 problems, 300 steps x 8, the whole held-out set
of 613, 384 new tokens). ``--quick`` fits a 2-core CPU in about a quarter of an hour (20 steps x 4
per recipe, 64 held-out questions, 256 new tokens). ``--tiny`` swaps in a tiny random Llama for a
plumbing check (tests). Every size is an option. ``--from OUT`` reuses a finished run's pipelines
and adapters (training only recipes it lacks) and evaluates again, e.g. all 613 questions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fairdistill.engine.errors import FairError, UsageError
from fairdistill.engine.rundir.schema import Problem, Sample

RECIPES = ("fair", "single-teacher", "fair-no-mistake", "fair-paper", "fair-paired")
TEACHERS = ("gpt", "gemini", "mistral")  # the replay profile's model names = the release's authors
RELEASE_FILES = tuple(
    f"fair-release/Llama-2-7b-chat-hf_svamp_{kind}_round0.json" for kind in ("rationale", "feedback", "false")
)
SVAMP_FILE = "svamp/SVAMP.json"

# Sizes: (full = GPU-size defaults, --quick = the 2-core CPU, --tiny = plumbing check).
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        problems=None, steps=300, batch_size=8, max_seq_len=1024, lr=2e-4,
        eval_n=None, max_new_tokens=384, eval_batch_size=64,
    ),
    "quick": dict(
        problems=None, steps=20, batch_size=4, max_seq_len=512, lr=5e-4,
        eval_n=64, max_new_tokens=256, eval_batch_size=16,
    ),
    "tiny": dict(
        problems=8, steps=3, batch_size=2, max_seq_len=256, lr=1e-3,
        eval_n=6, max_new_tokens=8, eval_batch_size=8,
    ),
}  # fmt: skip


class DataMissing(FairError):
    """The reference datasets this benchmark replays are not on this machine."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = "(default: full size; --quick / --tiny pick smaller ones)"
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per recipe {size}")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step")
    parser.add_argument("--max-seq-len", type=int, default=None, help="tokens per example")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (all recipes)")
    parser.add_argument("--alpha", type=float, default=0.5, help="mistake-loss weight of the fair recipe")
    parser.add_argument("--problems", type=int, default=None, help="cap the 387 training problems")
    parser.add_argument("--eval-n", type=int, default=None, help="held-out questions (default: all 613)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation length at eval")
    parser.add_argument("--eval-batch-size", type=int, default=None)
    parser.add_argument("--model", default=None, help="student: HF id or path (default: embedded SmolLM2)")
    parser.add_argument(
        "--gold-check",
        default="reject",
        choices=["reject", "review-anyway", "record-only", "off"],
        help="the committee run's gold check (default: the engine's, reject)",
    )
    parser.add_argument("--teacher", default="gpt", choices=TEACHERS, help="the single-teacher recipe's")
    parser.add_argument("--data-dir", default=None, help="datasets folder (default: $FAIR_DATA_DIR)")
    parser.add_argument("--out", default="runs/bench-replay-svamp")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama: plumbing check only")
    parser.add_argument(
        "--from",
        dest="from_dir",
        default=None,
        help="reuse a finished run's pipelines and adapters (its OUT): evaluate only, e.g. on more questions",
    )
    parser.add_argument(
        "--eval-models",
        default=None,
        help=f"comma-separated models to evaluate (default: base,{','.join(RECIPES)})",
    )


# -- data -----------------------------------------------------------------------------------------


def find_data(data_dir: str | None) -> Path:
    """The datasets folder holding the release and SVAMP; ``DataMissing`` names what is absent."""
    from fairdistill.engine.sim.replay import REPO_ROOT
    from fairdistill.engine.sim.replay import data_dir as default_dir

    explicit = data_dir or os.environ.get("FAIR_DATA_DIR")  # named: no silent fallback elsewhere
    root = Path(explicit) if explicit else default_dir()
    if root is None:
        raise DataMissing(
            "bench replay-svamp: reference datasets not found; pass --data-dir or set FAIR_DATA_DIR "
            f"(looked in {REPO_ROOT.parent / 'shared' / 'datasets'})"
        )
    missing = [str(root / f) for f in (*RELEASE_FILES, SVAMP_FILE) if not (root / f).is_file()]
    if missing:
        raise DataMissing("bench replay-svamp: missing " + ", ".join(missing))
    return root.resolve()


def held_out(data: Path, train: list[Problem], n: int | None, seed: int) -> list[Problem]:
    """SVAMP questions whose text is not a replayed training question; a seeded subset of ``n``."""
    from fairdistill.engine.fair.datasets import load_svamp
    from fairdistill.engine.sim.content import norm

    seen = {norm(p.question).lower() for p in train}
    pool = [p for p in load_svamp(data / SVAMP_FILE) if norm(p.question).lower() not in seen]
    if n is None or n >= len(pool):
        return pool
    keep = sorted(random.Random(seed).sample(range(len(pool)), n))
    return [pool[i] for i in keep]


# -- pipeline -------------------------------------------------------------------------------------


def job_config(sim_url: str, seed: int, gold_check: str = "reject", paper: bool = False):
    """The committee job; ``paper``: the paper's configuration (``examples/paper.toml``: paper
    prompts with the gold hint in review, no gold check, texts kept as written)."""
    from fairdistill.engine.config import RunConfig, convert_config

    endpoints = {t: {"base_url": sim_url, "model": t} for t in TEACHERS}
    endpoints["student"] = {"base_url": sim_url, "model": "student"}
    raw = {
        "run": {"seed": seed},
        "dataset": {"name": "svamp", "split": "all"},  # the 387 replayed questions, whatever split
        "student": {"endpoint": "student", "attempts": 1, "temperature": 0.0},
        "teachers": {"endpoints": list(TEACHERS)},
        "endpoints": endpoints,
        "review": {"gold_check": gold_check},
    }  # otherwise the defaults: accept iff mean score > 3, sample policy "paper"
    if paper:
        # every reviewer asked (no early stop), so the report shows the paper's committee whole
        review = {"gold_check": "off", "early_stop": False}
        raw.update(prompts="paper", review=review, samples={"answer_line": False})
        raw["student"].update(temperature=0.3, top_p=0.9)  # replayed: the recorded answers either way
        raw["teachers"].update(temperature=0.8, max_tokens=512)
    return convert_config(raw, RunConfig, source="bench replay-svamp")


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_pipeline(
    out: Path, data: Path, problems: list[Problem], seed: int, gold_check: str, paper: bool = False
) -> dict:
    """The FAIR job over the replayed committee; returns its figures (and the run directory)."""
    from fairdistill.engine.fair.pipeline import Job
    from fairdistill.engine.fair.report import summarize
    from fairdistill.engine.services import Services, free_port

    run_dir = out / ("run-paper" if paper else "run")
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    with Services(out / "logs") as services:
        port = free_port()
        with _env("FAIR_DATA_DIR", str(data)):  # the simulator child finds the release here
            services.start(
                "sim",
                ["sim", "--profile", "replay-svamp", "--port", str(port)],
                f"http://127.0.0.1:{port}/health",
                timeout=120,
            )
        job = Job(job_config(f"http://127.0.0.1:{port}/v1", seed, gold_check, paper), run_dir)
        outcome = asyncio.run(job.run(problems))
    s = summarize(run_dir)
    return {
        "run_dir": str(run_dir),
        "problems": s["problems_done"],
        "student_mistakes": s["mistakes"],
        "graded_correct": s["problems"].get("correct", 0),
        "rationales": sum(s["rationales"].values()),
        "accepted": s["rationales"].get("accepted", 0),
        "rejected_gold": s["rationales"].get("rejected_gold", 0),
        "rejected_review": s["rationales"].get("rejected_review", 0),
        "acceptance_rate": round(s["acceptance_rate"] or 0.0, 3),
        "feedback": s["feedback"],
        "reviews": s["reviews"],
        "samples_rationale": s["samples"].get("rationale", 0),
        "samples_mistake": s["samples"].get("mistake", 0),
        "calls": s["calls"],
        "failed_problems": len(outcome["failed_problems"]),
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0 + _children_cpu() - k0, 1),
    }


def paper_agreement(run_dir: Path, replay) -> dict:
    """How the run's verdicts compare with the release's own rule (valid scores 1-5, mean > 3).

    Most rationales the gold check rejects although the paper's reviewers passed them are wrong
    (the reviewers were lenient), but the release's texts were written for the paper's prompt,
    not ours, so their last line is rarely "The answer is X" and the extracted answer is sometimes
    another number of a right solution ("4 packs ... 26 dollars each" gives 26). Those state the
    gold number in their last line: counted apart, a heuristic."""
    import re

    from fairdistill.engine.fair.answers import is_correct
    from fairdistill.engine.rundir.store import iter_raw

    items = {it.id: it for it in replay.items.values()}
    paper_ok = gold_but_ok = gold_in_last_line = review_but_ok = 0
    for r in iter_raw(run_dir, "rationales"):
        item = items.get(r["problem_id"])
        scores = item.rationales.get(r["teacher"], ("", []))[1] if item else []
        valid = [x for x in scores if 1 <= x <= 5]
        ok = bool(valid) and sum(valid) / len(valid) > 3
        paper_ok += ok
        if ok and r["status"] == "rejected_gold":
            gold_but_ok += 1
            last = r["text"].strip().rsplit("\n", 1)[-1]
            numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", last)
            gold_in_last_line += any(is_correct(x, item.gold, "numeric") for x in numbers)
        review_but_ok += ok and r["status"] == "rejected_review"
    return {
        "paper_rule_accepts": paper_ok,
        "rejected_gold_paper_accepts": gold_but_ok,
        "of_which_gold_in_last_line": gold_in_last_line,
        "rejected_review_paper_accepts": review_but_ok,
    }


def _device_name(device: str) -> str:
    import torch

    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children: the stopped simulator
    return ru.ru_utime + ru.ru_stime


# -- recipes --------------------------------------------------------------------------------------


def recipe_samples(
    run_dir: Path, problems: list[Problem], teacher: str, paper_run: Path | None = None
) -> dict[str, list[Sample]]:
    """The samples each recipe trains on, from the committee runs' records."""
    from fairdistill.engine.fair.prompts import prompt_set
    from fairdistill.engine.rundir.schema import Msg, Rationale
    from fairdistill.engine.rundir.store import iter_records
    from fairdistill.trainer.data import load_samples

    committee = load_samples([run_dir])
    by_id = {p.id: p for p in problems}
    single: list[Sample] = []
    for r in sorted(iter_records(run_dir, "rationales", Rationale), key=lambda r: r.id):
        if r.teacher != teacher:
            continue
        solve = prompt_set(r.prompt_version or "v1").render("solve", by_id[r.problem_id])
        single.append(
            Sample(
                id=f"{r.problem_id}/sample/rationale/{teacher}",
                problem_id=r.problem_id,
                task="rationale",
                messages=[Msg(m.role, m.content) for m in solve],
                response=r.text,
                teacher=teacher,
                source_id=r.id,
                prompt_version=r.prompt_version,
            )
        )
    return {
        "fair": committee,
        "single-teacher": single,
        "fair-no-mistake": [s for s in committee if s.task == "rationale"],
        "fair-paper": load_samples([paper_run]) if paper_run is not None else [],
        "fair-paired": committee,
    }


# Every arm sees batch_size rationale examples per step (the mistake task is FAIR's extra): the
# rationale-only arms a batch of them, fair-paper a rationale batch plus a mistake batch (paired),
# fair one mixed batch of twice the size (about half of it rationales, the same tokens per step
# as fair-paper in one pass).
BATCHING = {"fair": ("mixed", 2), "single-teacher": ("mixed", 1), "fair-no-mistake": ("mixed", 1),
            "fair-paper": ("paired", 1), "fair-paired": ("paired", 1)}  # fmt: skip


def train_recipe(name: str, samples: list[Sample], out: Path, opts: dict, alpha: float) -> dict:
    """One recipe under the shared budget; returns its row (with wall and CPU seconds)."""
    from fairdistill.trainer.data import write_run_dir
    from fairdistill.trainer.train import TrainConfig, train

    run_dir = write_run_dir(out / "recipes" / name, samples)
    batching, scale = BATCHING[name]
    cfg = TrainConfig(
        inputs=[str(run_dir)],
        out=str(out / "train" / name),
        model=opts["model"],
        alpha=alpha,
        max_steps=opts["steps"],
        batch_size=opts["batch_size"] * scale,
        batching=batching,
        max_seq_len=opts["max_seq_len"],
        lr=opts["lr"],
        seed=opts["seed"],
        val_fraction=0.0,
        eval_every=0,
        save_every=0,
        device=opts["device"],
    )
    print(f"\n== training {name} on {len(samples)} samples", file=sys.stderr, flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["split"] == "train"][-5:]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in last if r.get(key) is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    tasks = [s.task for s in samples]
    n_rat = [r["tokens_rationale"] for r in rows if r["split"] == "train"]
    return {
        "recipe": name,
        "batching": batching,
        "rationale_tokens_per_step": round(sum(n_rat) / len(n_rat)) if n_rat else None,
        "samples": len(samples),
        "rationale": tasks.count("rationale"),
        "mistake": tasks.count("mistake"),
        "teachers": ",".join(sorted({s.teacher for s in samples})),
        "problems": len({s.problem_id for s in samples}),
        "alpha": alpha,
        "steps": summary["steps"],
        "epochs": round(summary["steps"] * cfg.batch_size / max(1, summary["train_examples"]), 2),
        "tokens": summary["tokens_seen"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "final_loss": round(summary["loss"], 4) if summary["loss"] is not None else None,
        "loss_rationale_last5": mean("loss_rationale"),
        "loss_mistake_last5": mean("loss_mistake"),
        "truncated": summary["truncated"],
        "dropped": summary["dropped"],
        "adapter": summary["adapter"],
    }


def cut_at_limit(wrong_dir: Path, names: list[str], model: str | None, limit: int) -> dict[str, int]:
    """Per model, the strictly-wrong answers whose text ran into ``max_new_tokens``: a cap that is
    too short shows up here. Approximate: the decoded text is re-tokenized (prose comes back to
    the same length within a token or two; runs of whitespace merge into fewer tokens)."""
    from fairdistill.trainer.model import load_tokenizer

    tok = load_tokenizer(model)
    out = {}
    for name in names:
        path = wrong_dir / f"{name}__svamp-heldout.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        out[name] = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) >= limit - 2 for r in rows)
    return out


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the discordant pairs (binomial, p = 1/2)."""
    from math import comb

    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


PAIRS = (("fair-paper", "single-teacher"), ("fair", "single-teacher"), ("fair-paper", "fair"),
         ("fair", "fair-paired"), ("fair", "fair-no-mistake"), ("fair-paper", "base"), ("fair", "base"),
         ("single-teacher", "base"))  # fmt: skip


def paired_tests(eval_dir: Path, evalset: list[Problem], names: list[str]) -> list[dict]:
    """McNemar on the same held-out questions, flexible grading: per pair of models, how many
    questions only the first got right (b), only the second (c), and the exact p-value."""
    right = {}
    for name in names:
        path = eval_dir / "wrong" / f"{name}__svamp-heldout.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        wrong = {r["id"] for r in rows if not r["flexible_ok"]}
        right[name] = {p.id for p in evalset} - wrong
    out = []
    for a, b in PAIRS:
        if a in right and b in right:
            only_a, only_b = len(right[a] - right[b]), len(right[b] - right[a])
            row = {"a": a, "b": b, "only_a": only_a, "only_b": only_b, "p": round(mcnemar(only_a, only_b), 4)}
            out.append(row | power(only_a, only_b, len(evalset)))
    return out


Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5 %, 80 % power


def power(b: int, c: int, n: int) -> dict:
    """What these paired results could resolve (normal approximation to McNemar, Connor 1987):
    ``mdd80`` the smallest accuracy difference detectable with 80 % power at this ``n`` and the
    observed discordance, and ``n_for_observed`` the questions needed to detect the observed
    difference (``None`` when the difference is zero or the questions discordant are too few)."""
    if n <= 0 or b + c == 0:
        return {"mdd80": None, "n_for_observed": None}
    disc, diff = (b + c) / n, abs(b - c) / n
    mdd = (Z_ALPHA + Z_POWER) * (disc / n) ** 0.5
    needed = None
    if diff > 0 and diff**2 < disc:
        needed = ((Z_ALPHA * disc**0.5 + Z_POWER * (disc - diff**2) ** 0.5) / diff) ** 2
    return {"mdd80": round(mdd, 4), "n_for_observed": None if needed is None else int(needed) + 1}


# -- the benchmark --------------------------------------------------------------------------------


def resolve(args: argparse.Namespace) -> dict:
    preset = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    opts = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in preset.items()}
    opts.update(model=args.model, device=args.device, seed=args.seed, teacher=args.teacher, alpha=args.alpha)
    opts["gold_check"] = args.gold_check
    opts["size"] = "tiny" if args.tiny else "quick" if args.quick else "full"
    return opts


def run(args: argparse.Namespace) -> dict:
    t_start, c_start = time.perf_counter(), time.process_time()
    opts = resolve(args)
    data = find_data(args.data_dir)
    out = Path(args.out)
    source = Path(args.from_dir) if getattr(args, "from_dir", None) else None
    prev = reused(source, opts) if source is not None else None
    models = eval_models(getattr(args, "eval_models", None))
    fresh = ("eval",) if prev else ("run", "run-paper", "recipes", "train", "eval", "logs", "tiny-model")
    for sub in fresh:
        shutil.rmtree(out / sub, ignore_errors=True)  # a benchmark starts clean (no resume, no cache)
    out.mkdir(parents=True, exist_ok=True)

    from fairdistill.engine.sim.replay import ReplayData

    replay = ReplayData.load(data)
    all_train = replay.problems("svamp")
    problems = all_train[: opts["problems"]] if opts["problems"] else all_train
    evalset = held_out(data, all_train, opts["eval_n"], opts["seed"])  # disjoint from all 387
    (out / "eval_problems.jsonl").write_text(
        "".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n" for p in evalset)
    )

    if prev is not None:
        print(f"== reusing the pipelines and adapters of {source}", file=sys.stderr, flush=True)
        pipeline, pipeline_paper, done = prev["pipeline"], prev["pipeline_paper"], prev["training"]
    else:
        print(f"== FAIR pipeline on {len(problems)} replayed SVAMP problems", file=sys.stderr, flush=True)
        pipeline = run_pipeline(out, data, problems, opts["seed"], opts["gold_check"])
        pipeline.update(paper_agreement(Path(pipeline["run_dir"]), replay))
        print("== the same in paper mode", file=sys.stderr, flush=True)
        pipeline_paper = run_pipeline(out, data, problems, opts["seed"], "off", paper=True)
        pipeline_paper.update(paper_agreement(Path(pipeline_paper["run_dir"]), replay))
        done = []
        if opts["size"] == "tiny" and not opts["model"]:
            from fairdistill.trainer.model import save_tiny_student

            opts["model"] = save_tiny_student(out / "tiny-model")

    trained = {row["recipe"]: row for row in done}
    missing = [name for name in RECIPES if name not in trained and (prev is None or name in models)]
    if missing:  # --from a run without a newer recipe trains just that one, on the same records
        sets = recipe_samples(
            Path(pipeline["run_dir"]), problems, opts["teacher"], Path(pipeline_paper["run_dir"])
        )
        alphas = {"single-teacher": 0.0, "fair-no-mistake": 0.0, "fair-paper": 0.5}
        for name in missing:
            shutil.rmtree(out / "recipes" / name, ignore_errors=True)
            shutil.rmtree(out / "train" / name, ignore_errors=True)
            trained[name] = train_recipe(name, sets[name], out, opts, alphas.get(name, opts["alpha"]))
    training = [trained[name] for name in RECIPES if name in trained]

    from fairdistill.trainer.evaluate import evaluate

    adapters = {row["recipe"]: row["adapter"] for row in training if row["recipe"] in models}
    print(f"\n== evaluating {', '.join(m for m in ('base', *RECIPES) if m in models)} on {len(evalset)} "
          "held-out SVAMP questions", file=sys.stderr, flush=True)  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    ev = evaluate(
        opts["model"],
        adapters,
        {"svamp-heldout": evalset},
        include_base="base" in models,
        batch_size=opts["eval_batch_size"],
        max_new_tokens=opts["max_new_tokens"],
        out=out / "eval",
        progress=True,
        device=None if opts["device"] == "auto" else opts["device"],
        prompt_versions={"fair-paper": "paper"},  # tested with the prompt it was trained on
    )
    evaluation = {
        "backend": ev["backend"],
        "questions": len(evalset),
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "generated_tokens": ev["generated_tokens"],
        "tokens_per_s": round(ev["tokens_per_s"] or 0.0, 1),
    }
    cut = cut_at_limit(out / "eval" / "wrong", list(ev["results"]), opts["model"], opts["max_new_tokens"])
    accuracy = []
    for name, per in ev["results"].items():
        r = per["svamp-heldout"]
        row: dict[str, Any] = {"model": name, "n": r["strict"]["n"]}
        for mode in ("strict", "flexible"):
            row[mode] = round(r[mode]["accuracy"], 4)
            row[f"{mode}_lo"] = round(r[mode]["ci_low"], 4)
            row[f"{mode}_hi"] = round(r[mode]["ci_high"], 4)
        row["wrong_cut_at_limit"] = cut[name]
        accuracy.append(row)

    result = {
        "benchmark": "replay-svamp",
        "size": opts["size"],
        "model": opts["model"] or "SmolLM2-135M-Instruct (embedded)",
        "model_path": opts["model"],
        "reused": str(source) if source is not None else None,
        "device": _device_name(opts["device"]),
        "budget": {k: opts[k] for k in ("steps", "batch_size", "max_seq_len", "lr", "seed")},
        "teacher": opts["teacher"],
        "gold_check": opts["gold_check"],
        "train_problems": len(problems),
        "eval_questions": len(evalset),
        "max_new_tokens": opts["max_new_tokens"],
        "pipeline": pipeline,
        "pipeline_paper": pipeline_paper,
        "paired_tests": paired_tests(out / "eval", evalset, list(ev["results"])),
        "training": [{k: v for k, v in row.items() if k != "adapter"} for row in training],
        "adapters": {row["recipe"]: str(row["adapter"]) for row in training},
        "accuracy": accuracy,
        "evaluation": evaluation,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "cpu_s": round(time.process_time() - c_start + _children_cpu(), 1),
        "out": str(out),
        "exit_code": 1 if pipeline["failed_problems"] else 0,
    }
    result["report"] = str(write_report(out, result, ev))
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def eval_models(spec: str | None) -> tuple[str, ...]:
    """``--eval-models``: which of base and the recipes to evaluate (default all)."""
    known = ("base", *RECIPES)
    if not spec:
        return known
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(
            f"bench replay-svamp: --eval-models: unknown {unknown or spec!r} (have {', '.join(known)})"
        )
    return names


def reused(source: Path, opts: dict) -> dict:
    """A finished run's ``result.json`` (``--from``): its pipelines, training rows with their adapter
    folders, and the student and budget they were trained with (written into ``opts``)."""
    path = source / "result.json"
    try:
        prev = json.loads(path.read_text())
        training, budget = prev["training"], prev["budget"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"bench replay-svamp: --from {source}: no finished run's result.json ({exc})"
        ) from None
    rows = []
    for row in training:
        adapter = Path(
            (prev.get("adapters") or {}).get(row["recipe"]) or source / "train" / row["recipe"] / "adapter"
        )
        if not adapter.is_dir():
            raise UsageError(
                f"bench replay-svamp: --from {source}: adapter of {row['recipe']} missing: {adapter}"
            )
        rows.append({**row, "adapter": adapter})
    opts.update({k: budget[k] for k in ("steps", "batch_size", "max_seq_len", "lr")})
    opts["model"] = prev.get(
        "model_path", None if "(embedded)" in str(prev.get("model")) else prev.get("model")
    )
    opts["teacher"], opts["gold_check"] = (
        prev.get("teacher", opts["teacher"]),
        prev.get("gold_check", "reject"),
    )
    return {**prev, "training": rows}


# -- rendering ------------------------------------------------------------------------------------

TRAIN_COLS = ["recipe", "samples", "rationale", "mistake", "teachers", "alpha", "batching",
              "rationale_tokens_per_step", "steps", "epochs", "tokens", "wall_s", "cpu_s", "final_loss",
              "loss_rationale_last5"]  # fmt: skip


def _ci(row: dict, mode: str) -> str:
    return f"{100 * row[mode]:.1f} % [{100 * row[mode + '_lo']:.1f}, {100 * row[mode + '_hi']:.1f}]"


def _accuracy_rows(result: dict) -> list[dict]:
    return [
        {"model": r["model"], "n": r["n"], "strict [95% CI]": _ci(r, "strict"),
         "flexible [95% CI]": _ci(r, "flexible"), "wrong & cut": r["wrong_cut_at_limit"]}
        for r in result["accuracy"]
    ]  # fmt: skip


def table(result: dict) -> str:
    from fairdistill.benchmarks import format_table

    p, e, b = result["pipeline"], result["evaluation"], result["budget"]
    return "\n".join(
        [
            f"replay-svamp ({result['size']}): {result['model']} on {result['device']}, "
            f"{b['steps']} steps x {b['batch_size']} (seq {b['max_seq_len']}, lr {b['lr']}) per recipe",
            f"pipeline: {p['problems']} problems, {p['student_mistakes']} mistakes, "
            f"{p['accepted']}/{p['rationales']} rationales accepted ({p['rejected_gold']} gold, "
            f"{p['rejected_review']} review rejected), samples {p['samples_rationale']} rationale + "
            f"{p['samples_mistake']} mistake, {p['calls']} calls, {p['wall_s']} s wall / {p['cpu_s']} s CPU",
            f"  gold check {result['gold_check']}; the release's own review rule accepts "
            f"{p['paper_rule_accepts']} of these {p['rationales']}, among them "
            f"{p['rejected_gold_paper_accepts']} the gold check rejected and "
            f"{p['rejected_review_paper_accepts']} our review rejected",
            "",
            format_table(result["training"], TRAIN_COLS),
            "",
            f"held-out SVAMP ({result['eval_questions']} questions not among the 387 training ones, "
            f"greedy, {result['max_new_tokens']} new tokens; {e['backend']}, {e['wall_s']} s wall / "
            f"{e['cpu_s']} s CPU):",
            format_table(_accuracy_rows(result)),
            "",
            "paired (McNemar, flexible, same questions): "
            + "; ".join(
                f"{t['a']} vs {t['b']}: {t['only_a']}/{t['only_b']} p={t['p']}"
                + (f" (detectable {100 * t['mdd80']:.1f} pts)" if t.get("mdd80") else "")
                for t in result["paired_tests"]
            ),
            "",
            f"total {result['wall_s']} s wall, {result['cpu_s']} s CPU; report {result['report']}",
        ]
    )


def write_report(out: Path, result: dict, ev: dict) -> Path:
    from fairdistill.trainer.evaluate import report_markdown

    p, b = result["pipeline"], result["budget"]

    def md(rows: list[dict], cols: list[str] | None = None) -> list[str]:
        if not rows:
            return ["(none: no pair of these models evaluated)"]
        cols = cols or list(rows[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return lines + [
            "| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows
        ]

    lines = [
        "# replay-svamp: FAIR vs one teacher vs FAIR without mistake learning",
        "",
        f"Student {result['model']} on {result['device']} ({result['size']} size). Same budget per "
        f"recipe: {b['steps']} optimizer steps x {b['batch_size']} examples, max {b['max_seq_len']} "
        f"tokens, lr {b['lr']}, seed {b['seed']}, LoRA r=16 on all linear layers.",
        "",
        "- **fair**: the committee run's samples (accepted rationales + mistake explanations), "
        f"alpha {result['training'][0]['alpha']};",
        f"- **single-teacher**: every rationale of `{result['teacher']}` for the same problems, no gold "
        "check, no peer review, no mistake learning (built from the committee run's rationale "
        "records: a run config needs two teachers);",
        "- **fair-no-mistake**: the committee run's rationale samples only (alpha 0);",
        "- **fair-paper**: the paper's method (`examples/paper.toml`): paper prompts, the gold as a "
        "hint in the review prompt, no gold check, texts as written; paired batches (a rationale "
        "batch and a mistake batch per step), alpha 0.5; tested with its own (paper) solve prompt.",
        "- **fair-paired**: fair's samples and alpha, trained with the paper's paired batches instead "
        "of one mixed batch (the batching alone differs).",
        "",
        "Every arm sees the same number of rationale examples per step (`batch_size`): fair-paper "
        "adds a mistake batch, fair a mixed batch of twice the size.",
        "",
        "## Pipeline (replayed FAIR-release texts)",
        "",
        f"Gold check `{result['gold_check']}`, then peer review (accept iff mean valid score > 3), "
        "sample policy `paper` (one accepted rationale and one explanation per mistake). "
        "`paper_rule_accepts` applies the release's own review rule to the same rationales; "
        "`rejected_gold_paper_accepts` counts rationales the gold check rejected although the paper's "
        "reviewers accepted them: mostly wrong rationales lenient reviewers passed, but "
        "`of_which_gold_in_last_line` state the gold number in their last line (the release's texts "
        "do not end in our instructed answer line, so the extracted answer can be another number of "
        "a right solution).",
        "",
        *md([{"figure": k, "value": v} for k, v in p.items() if k != "run_dir"]),
        "",
        "## Training",
        "",
        *md(result["training"], TRAIN_COLS),
        "",
        f"## Held-out accuracy ({result['eval_questions']} SVAMP questions not used for training)",
        "",
        "Greedy decoding, 95 % Wilson intervals: read any difference against the interval widths. "
        f"`wrong & cut`: wrong answers that ran into the {result['max_new_tokens']}-token limit.",
        "",
        *md(_accuracy_rows(result)),
        "",
        "Paired test on the same questions (exact McNemar, flexible grading): `only_a` questions "
        "only the first model got right, `only_b` only the second; `mdd80` the smallest accuracy "
        "difference these questions detect with 80 % power at the observed discordance, "
        "`n_for_observed` the questions needed to detect the observed difference (normal "
        "approximation).",
        "",
        *md(result["paired_tests"]),
        "",
        "## Pipeline in paper mode (the fair-paper arm's samples)",
        "",
        *md([{"figure": k, "value": v} for k, v in result["pipeline_paper"].items() if k != "run_dir"]),
        "",
        report_markdown(ev).replace("# Student evaluation", "### Evaluation detail").strip(),
        "",
        "## Time",
        "",
        f"- pipeline: {p['wall_s']} s wall, {p['cpu_s']} s CPU (simulator included)",
        *[f"- train {r['recipe']}: {r['wall_s']} s wall, {r['cpu_s']} s CPU" for r in result["training"]],
        f"- evaluation: {result['evaluation']['wall_s']} s wall, {result['evaluation']['cpu_s']} s CPU",
        f"- total: {result['wall_s']} s wall, {result['cpu_s']} s CPU",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
