"""The ``fair`` command: parse arguments, then hand over to the library. No logic lives here.

Exit codes: 0 done; 1 finished with failed records; 2 bad usage or config; 3 aborted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import AbortRun, ConfigError, FairError

# command -> "module:function"; the function takes the parsed args and returns an exit code.
# Modules are imported only when their command runs, so `fair run` never imports torch.
HANDLERS = {
    "demo": "recipes.demo:main",
    "run": "engine.pipeline:cli_main",
    "generate": "engine.generate:cli_main",
    "status": "engine.status:cli_main",
    "sim": "engine.sim.server:cli_main",
    "serve-student": "trainer.serve:cli_main",
    "train": "trainer.train:cli_main",
    "eval": "trainer.evaluate:cli_main",
    "export": "engine.export:cli_main",
    "bench": "benchmarks:cli_main",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fair", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="the main job on the embedded default, end to end")
    s.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    s.add_argument("--problems", type=int, default=None, help="problems to run (default: all built-in)")
    s.add_argument("--train-steps", type=int, default=None)
    s.add_argument("--sim-student", action="store_true", help="simulated student instead of SmolLM2")

    s = sub.add_parser("run", help="a FAIR job; re-running on an existing run dir resumes it")
    s.add_argument("config")
    s.add_argument("--run-dir", default=None)
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("generate", help="plain high-throughput generation, one request per input line")
    s.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--model", required=True)
    s.add_argument("--input", required=True, help="JSONL: {id, messages} or {id, prompt}")
    s.add_argument("--output", required=True, help="run directory (resumable)")
    s.add_argument("--provider", default="openai", choices=["openai", "anthropic", "gemini"])
    s.add_argument("--api-key-env", default=None, help="name of the env var holding the API key")
    s.add_argument("--concurrency", type=int, default=256)
    s.add_argument("--rpm", type=float, default=None)
    s.add_argument("--tpm", type=float, default=None)
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--timeout", type=float, default=120.0, help="deadline of one attempt, seconds")
    s.add_argument("--max-attempts", type=int, default=6)
    s.add_argument("--no-cache", action="store_true")
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("status", help="counts, cost and failures of a run, live or finished")
    s.add_argument("run_dir")

    s = sub.add_parser("sim", help="the simulator as a standalone OpenAI-compatible server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8900)
    s.add_argument("--profile", default="default", help="profile name or TOML file")
    s.add_argument("--dataset", default=None, help="dataset name for reasoning content")

    s = sub.add_parser("serve-student", help="OpenAI-compatible CPU student server")
    s.add_argument("--model", default=None, help="HF id or local path (default: SmolLM2-135M GGUF)")
    s.add_argument("--adapter", default=None, help="LoRA adapter folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001)
    s.add_argument("--max-batch", type=int, default=16)

    s = sub.add_parser("train", help="LoRA distillation on run directories' samples")
    s.add_argument("inputs", nargs="+", help="run directories or a train TOML config")
    s.add_argument("--out", default=None, help="output folder (default: runs/train)")
    s.add_argument("--model", default=None)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--resume", action="store_true")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--alpha", type=float, default=None, help="weight of the mistake loss (default 0.5)")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch")
    s.add_argument("--grad-accum", type=int, default=None)
    s.add_argument("--max-seq-len", type=int, default=None)
    s.add_argument("--lora-rank", type=int, default=None)
    s.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    s.add_argument("--no-packing", action="store_true", help="padded batches instead of packed rows")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("eval", help="accuracy of base and trained students on the benchmarks")
    s.add_argument("--model", default=None)
    s.add_argument("--adapter", action="append", default=[], help="NAME=DIR, repeatable")
    s.add_argument("--datasets", default="svamp", help="comma list: gsm8k,svamp,strategyqa,logiqa")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--out", default="runs/eval")
    s.add_argument("--split", default="test")
    s.add_argument("--no-base", action="store_true", help="evaluate the adapters only")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-new-tokens", type=int, default=384)
    s.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm"])
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("export", help="samples in TRL / ShareGPT / LLaMA-Factory / axolotl format")
    s.add_argument("run_dir")
    s.add_argument("--format", required=True, choices=["trl", "sharegpt", "llamafactory", "axolotl"])
    s.add_argument("--out", default=None)

    s = sub.add_parser("bench", help="benchmarks; --json prints one JSON object as the last line")
    s.add_argument("name", help="throughput | pipeline | train | serve | replay-svamp")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quick", action="store_true", help="a smaller, faster version")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, func = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module), func)
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"fair: config error: {exc}", file=sys.stderr)
        return 2
    except AbortRun as exc:
        print(f"fair: aborted: {exc}", file=sys.stderr)
        return 3
    except FairError as exc:
        print(f"fair: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fair: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
