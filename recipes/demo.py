"""`fair demo`: the whole of fairdistill on the embedded default, in minutes, on a CPU.

1. start the simulator's three teachers (``committee`` profile) and the student server with the
   real SmolLM2-135M-Instruct, on loopback (``vllm serve`` when vLLM is installed, else on CPU);
2. run the FAIR job on the training part of the built-in problem set (real student mistakes);
3. train a few LoRA steps on the samples;
4. evaluate base vs trained student on the held-back part;
5. write ``report.md`` and print where everything is. Every server started is stopped, also on
   Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from fairdistill.engine.config import DatasetSection, RunConfig, convert_config
from fairdistill.engine.fair.datasets import load_problems
from fairdistill.engine.fair.pipeline import Job
from fairdistill.engine.fair.report import render_markdown, summarize
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.services import Services, free_port

TEACHERS = ["gpt-sim", "claude-sim", "gemini-sim"]


def split(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    """Every fourth problem is held back for evaluation; the rest feed the FAIR job."""
    return [p for i, p in enumerate(problems) if i % 4], [p for i, p in enumerate(problems) if not i % 4]


def job_config(sim_url: str, student_url: str, student_model: str, sim_student: bool) -> RunConfig:
    # the simulated teachers answer in about a second; a call that hangs (the sim injects a few)
    # is abandoned and retried after 20 s, not after the 120 s default meant for real APIs
    endpoints = {
        t: {"base_url": sim_url, "model": t, "price_in": p_in, "price_out": p_out, "timeout_s": 20}
        for t, p_in, p_out in zip(TEACHERS, (0.15, 0.80, 0.10), (0.60, 4.00, 0.40), strict=True)
    }
    endpoints["student"] = {
        "base_url": student_url,
        "model": student_model,
        "concurrency": 32,
        "timeout_s": 600,
    }
    raw = {
        "run": {"seed": 0},
        "dataset": {"name": "builtin"},
        "student": {"endpoint": "student", "attempts": 1, "temperature": 0.0, "max_tokens": 192},
        "teachers": {"endpoints": TEACHERS, "max_tokens": 512},
        "endpoints": endpoints,
    }
    if sim_student:
        endpoints["student"] = {"base_url": sim_url, "model": "student-sim"}
    return convert_config(raw, RunConfig, source="fair demo")


def _models(base_url: str) -> list[str]:
    with urllib.request.urlopen(base_url + "/models", timeout=10) as r:
        return [m["id"] for m in json.load(r)["data"]]


def _say(text: str) -> None:
    print(f"\n== {text}", file=sys.stderr, flush=True)


def main(args) -> int:
    t_start = time.monotonic()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # a demo starts clean; real runs resume instead
    out.mkdir(parents=True)
    problems = load_problems(DatasetSection(name="builtin"))
    if args.problems:
        problems = problems[: args.problems]
    train_set, held_out = split(problems)
    timings: dict[str, float] = {}

    with Services(out / "logs") as services:
        _say("starting the simulated committee and the SmolLM2-135M student server")
        sim_port, student_port = free_port(), free_port()
        sim_url = f"http://127.0.0.1:{sim_port}/v1"
        services.start(
            "sim",
            ["sim", "--profile", "committee", "--dataset", "builtin", "--port", str(sim_port)],
            f"http://127.0.0.1:{sim_port}/health",
        )
        student_url, student_model = sim_url, "student-sim"
        if not args.sim_student:
            student_url = f"http://127.0.0.1:{student_port}/v1"
            # `vllm serve` when vLLM is installed (a GPU machine), else the CPU server
            services.start(
                "student",
                ["serve-student", "--port", str(student_port), "--backend", "auto"],
                f"{student_url}/models",
                timeout=900,
                grace=30,
            )
            student_model = _models(student_url)[0]
        timings["servers_s"] = time.monotonic() - t_start

        _say(f"FAIR job on {len(train_set)} built-in problems (run directory {out / 'run'})")
        t0 = time.monotonic()
        cfg = job_config(sim_url, student_url, student_model, args.sim_student)
        summary = asyncio.run(Job(cfg, out / "run").run(train_set))
        timings["pipeline_s"] = time.monotonic() - t0
        services.stop("student")  # free the cores for training

    run_summary = summarize(out / "run")
    n_samples = sum(run_summary["samples"].values())
    train_result, eval_result = None, None
    if n_samples:
        from fairdistill.trainer.evaluate import evaluate
        from fairdistill.trainer.train import TrainConfig, train

        _say(f"training LoRA on {n_samples} samples")
        t0 = time.monotonic()
        train_result = train(
            TrainConfig(
                inputs=[str(out / "run")],
                out=str(out / "train"),
                max_steps=args.train_steps or 8,
                batch_size=4,
                max_seq_len=768,
                lr=5e-4,
                val_fraction=0.0,
                eval_every=0,
                save_every=0,
                warmup_steps=1,
            )
        )
        timings["train_s"] = time.monotonic() - t0

        _say(f"evaluating base vs trained student on {len(held_out)} held-back problems")
        t0 = time.monotonic()
        eval_result = evaluate(
            None,
            {"fair": out / "train" / "adapter"},
            {"builtin-held-out": held_out},
            max_new_tokens=192,
            batch_size=len(held_out),
            out=out / "eval",
        )
        timings["eval_s"] = time.monotonic() - t0
    timings["total_s"] = time.monotonic() - t_start

    report = write_demo_report(out, run_summary, train_result, eval_result, timings)
    _say("done")
    print(f"report:          {report}", file=sys.stderr)
    print(f"run directory:   {out / 'run'}  (fair status {out / 'run'})", file=sys.stderr)
    if train_result:
        print(f"trained adapter: {out / 'train' / 'adapter'}", file=sys.stderr)
    print(f"total time:      {timings['total_s']:.0f} s", file=sys.stderr)
    return 1 if summary["failed_problems"] else 0


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_demo_report(out: Path, run_summary: dict, train_result, eval_result, timings: dict) -> Path:
    parts = [render_markdown(run_summary, title="fairdistill demo").rstrip()]
    if train_result:
        parts += ["", "## Training (LoRA, L = α·L_mistake + (1-α)·L_rationale)", ""]
        parts += [
            f"- {k}: {_fmt(v)}"
            for k, v in train_result.items()
            if v is not None and not isinstance(v, (dict, list))
        ]
        plot = out / "train" / "loss.png"
        if plot.exists():
            parts += ["", f"![losses]({plot.relative_to(out)})"]
    if eval_result:
        from fairdistill.trainer.evaluate import report_markdown

        parts += ["", "## Held-back accuracy, base vs trained", "", report_markdown(eval_result).strip()]
    parts += ["", "## Time", ""] + [f"- {k}: {v:.1f}" for k, v in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
