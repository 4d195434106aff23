"""What ``fair --help`` and ``fair COMMAND --help`` say beyond the flags: a sentence or two on what
each command does, and one or two examples to copy. ``finish`` lays them over the parser that
``engine.cli.build_parser`` built, so the flags stay where they are defined.
"""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = (
    "fairdistill: a committee of teacher LLMs teaches a small student (FAIR: fault-aware "
    "distillation via peer review), and an engine for large resumable generation jobs."
)

EPILOG = """\
exit codes: 0 done; 1 finished with failed records (run again to retry them); 2 bad usage,
config or damaged input; 3 aborted (credentials refused, error-rate breaker, cost cap).

examples:
  fair init --sim job.toml                              # a starter config
  fair sim --profile committee --dataset builtin &      # the simulated committee
  fair run job.toml --run-dir runs/job
"""

# command -> (description, examples)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "Run the main job end to end on the embedded default (no API key, no GPU): simulated "
        "teachers, the real SmolLM2-135M student on CPU, a few LoRA steps, an evaluation and "
        "OUT/report.md.",
        "fair demo\n  fair demo --sim-student --problems 10 --out runs/demo-quick",
    ),
    "run": (
        "Run the FAIR job described by CONFIG, a TOML file naming the dataset, the endpoints, "
        "the student and the teachers (`fair init` writes a commented one). Records, response "
        "cache, trace and report.md go to the run directory (--run-dir, default runs/CONFIG_NAME); "
        "running the same command on an existing run directory resumes it: finished problems "
        "are skipped and nothing already paid is paid again.",
        "fair run job.toml --run-dir runs/job\n  fair run job.toml --estimate --pilot 20",
    ),
    "generate": (
        "The engine without the FAIR method: one chat request per input line ({id, messages} or "
        "{id, prompt}), one `responses` record per id in OUTPUT. Kill it and run the same command "
        "again: it continues with no duplicate, no missing id, and pays nothing twice.",
        "fair generate --endpoint http://127.0.0.1:8900/v1 --model gpt-sim --input prompts.jsonl "
        "--output runs/gen\n  fair generate --endpoint https://api.openai.com/v1 --model gpt-5-mini "
        "--api-key-env OPENAI_API_KEY --input prompts.jsonl --output runs/gen --mode batch",
    ),
    "batches": (
        "Inspect and steer the provider batches of a run directory (batch mode): list them, "
        "attach a batch whose create reply was lost, cancel running ones.",
        "fair batches list runs/job\n  fair batches attach runs/job LOCAL_ID batch_abc123",
    ),
    "status": (
        "Counts, cost, acceptance and failures of a run directory, while it runs or after.",
        "fair status runs/job",
    ),
    "sim": (
        "A simulated OpenAI/Anthropic/Gemini-compatible server: latency, rate limits, faults, "
        "skill and reviewer leniency per model, from a profile (default, committee, fast, "
        "faulty, realistic, replay-svamp, or a TOML file).",
        "fair sim --profile committee --dataset builtin --port 8900",
    ),
    "serve-student": (
        "Serve a student model over the OpenAI chat API: a batching CPU server, or `vllm serve` "
        "as a child process.",
        "fair serve-student --port 8001\n  fair serve-student --backend vllm --adapter "
        "fair-r1=runs/train/adapter --port 8001",
    ),
    "train": (
        "Fine-tune the student (LoRA by default) on the samples of one or more run directories "
        "with the FAIR loss; writes OUT/adapter, OUT/best, metrics and a loss plot.",
        "fair train runs/job --out runs/train\n  fair train examples/train/paper.toml",
    ),
    "eval": (
        "Accuracy of the base model and of trained adapters on the benchmarks' test split, with "
        "confidence intervals; refuses to score questions a model was trained on.",
        "fair eval --adapter fair=runs/train/adapter --datasets gsm8k,svamp",
    ),
    "export": (
        "Write a run's samples in the format a training stack reads.",
        "fair export runs/job --format trl",
    ),
    "repair": (
        "Move unreadable lines of a damaged run directory to RUN_DIR/quarantine/, mark their "
        "problems not done and rewrite the manifest, so the run can be resumed.",
        "fair repair runs/job",
    ),
    "bench": (
        "Run a benchmark; each prints a table, and with --json one JSON object as its last line.",
        "fair bench throughput --quick --json\n  fair bench pipeline --quick",
    ),
    "init": (
        "Write a commented starter config to PATH: --sim for the simulator's committee (runs as "
        "is against `fair sim`), --providers for real teachers. Every field is listed with its "
        "description; commented-out lines show defaults.",
        "fair init --sim job.toml\n  fair init --providers openai,anthropic,gemini job.toml",
    ),
}


def finish(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and each of its commands their description and examples."""
    parser.description = _wrap(DESCRIPTION)
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        action.metavar = "command"  # not the list of every command name
        for name, sub in getattr(action, "choices", {}).items():
            if name in COMMANDS:
                text, examples = COMMANDS[name]
                sub.description = _wrap(text)
                sub.epilog = f"examples:\n  {examples}\n"
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _wrap(text: str, width: int = 78) -> str:
    return textwrap.fill(text, width)
