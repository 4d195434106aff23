"""The ``fair`` command: parse arguments, then hand over to the library. No logic lives here.

Exit codes: 0 done; 1 finished with failed records; 2 bad usage or config; 3 aborted.
Every error is one line on stderr. An unexpected exception (a bug) is one line plus the path of
a log file holding the traceback; ``FAIR_DEBUG=1`` prints the traceback inline instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import os
import socket
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine import clihelp
from fairdistill.engine import config as C
from fairdistill.engine.errors import AbortRun, ConfigError, FairError, UsageError, one_line
from fairdistill.engine.extras import missing_extra
from fairdistill.engine.flagcheck import check_flags

# command -> "module:function"; the function takes the parsed args and returns an exit code.
# Modules are imported only when their command runs, so `fair run` never imports torch.
HANDLERS = {
    "demo": "fairdistill.recipes.demo:main",
    "run": "fairdistill.engine.cliopts:run",  # typed options, then engine.launch
    "generate": "fairdistill.engine.cliopts:generate",
    "status": "fairdistill.engine.fair.status:cli_main",
    "sim": "fairdistill.engine.sim.server:cli_main",
    "serve-student": "fairdistill.trainer.serve:cli_main",
    "train": "fairdistill.trainer.train:cli_main",
    "eval": "fairdistill.trainer.evaluate:cli_main",
    "export": "fairdistill.engine.rundir.export:cli_main",
    "bench": "fairdistill.benchmarks:cli_main",
    "repair": "fairdistill.engine.rundir.repair:cli_main",
    "batches": "fairdistill.engine.request.batch.cli:cli_main",
    "init": "fairdistill.engine.starter:cli_main",
}

# OSErrors that are the user's to fix (a path, a port): exit 2 and one line, no log file.
USER_ERRNOS = {
    errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.ENOSPC, errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.ENAMETOOLONG, errno.ENOTEMPTY,
}  # fmt: skip
# ...and the same raised by our own code with a message only (``FileNotFoundError("adapter ...")``)
USER_OSERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``fair generate: --max-tokens: ...``), exit 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def checked(kind: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that converts the text and applies a config type's range check, so
    flags and TOML fields share one definition (``engine.config``)."""
    base = typing.get_args(kind)[0]

    def convert(text: str) -> Any:
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        try:
            return msgspec.convert(value, kind)
        except msgspec.ValidationError as exc:
            detail = str(exc).removesuffix(" - at `$`").replace("Expected", "expected")
            raise argparse.ArgumentTypeError(f"{detail}, got {text!r}") from None

    convert.__name__ = base.__name__  # argparse names the type in its own messages
    return convert


POS = checked(C.PosInt)
NONNEG = checked(C.NonNegInt)
COUNT = checked(C.Count)
TOKENS = checked(C.Tokens)
PORT = checked(C.Port)
RATE = checked(C.Rate)
SECONDS = checked(C.Seconds)
TEMP = checked(C.Temperature)
ATTEMPTS = checked(C.Attempts)
POSFLOAT = checked(C.PosFloat)

# flag defaults come from the config Structs, so `fair generate` and a TOML endpoint agree
ENDPOINT_DEFAULTS = {f.name: f.default for f in msgspec.structs.fields(C.EndpointConfig)}


def add_vllm_flags(s: argparse.ArgumentParser) -> None:
    """vLLM's memory share and LoRA rank (checked against the installed vLLM's ranks when used)."""
    s.add_argument("--gpu-memory-utilization", type=checked(C.Share), default=None,
                   help="vLLM: share of GPU memory it may take (its default 0.9)")  # fmt: skip
    s.add_argument("--max-lora-rank", type=POS, default=None,
                   help="vLLM: an allowed rank (default: smallest >= the adapters' rank)")  # fmt: skip


def add_ray_flags(s: argparse.ArgumentParser) -> None:
    """Scale-out on Ray (``engine.scale``): the same job over N worker actors."""
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: local (default: start one here), auto, or HOST:PORT")  # fmt: skip
    s.add_argument("--workers", type=POS, default=None, help="--ray: worker actors (default 2)")
    s.add_argument("--block-size", type=POS, default=None,
                   help="--ray: input lines (generate, 1000) or problems (run, 25) per block")  # fmt: skip


def add_loop_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"],
                   help="event loop (uvloop: pip install 'fairdistill[uvloop]')")  # fmt: skip


def use_loop(name: str) -> None:
    """Make every later ``asyncio.run`` use uvloop's loop (``asyncio``: leave it as is)."""
    if name != "uvloop":
        return
    try:
        import uvloop
    except ImportError:
        raise UsageError("--loop uvloop: not installed (pip install 'fairdistill[uvloop]')") from None
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _add_demo(sub: Any) -> None:
    """``fair demo``'s flags."""
    s = sub.add_parser("demo", help="the main job on the embedded default, end to end")
    s.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    s.add_argument("--problems", type=POS, default=None, help="problems to run (default: all built-in)")
    s.add_argument("--train-steps", type=POS, default=None, help="LoRA steps on the samples (default 8)")
    s.add_argument("--sim-student", action="store_true", help="simulated student instead of SmolLM2")


def _add_run(sub: Any) -> None:
    """``fair run``'s flags."""
    s = sub.add_parser("run", help="a FAIR job; re-running on an existing run dir resumes it")
    s.add_argument("config", help="the job's TOML file (write one with `fair init`)")
    s.add_argument("--run-dir", default=None,
                   help="where records, cache, trace and report go; an existing one is resumed "
                   "(default: runs/CONFIG_NAME)")  # fmt: skip
    s.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    s.add_argument("--metrics-port", type=PORT, default=None, help="serve Prometheus /metrics here")
    s.add_argument("--estimate", action="store_true",
                   help="run a pilot slice, print projected calls, tokens, $ and time, and stop")  # fmt: skip
    s.add_argument("--pilot", type=POS, default=None, help="problems in the --estimate pilot (default 20)")
    add_ray_flags(s)
    add_loop_flag(s)


def _add_generate(sub: Any) -> None:
    """``fair generate``'s flags."""
    s = sub.add_parser("generate", help="plain high-throughput generation, one request per input line")
    s.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--model", required=True, help="model name sent with every request")
    s.add_argument("--input", required=True, help="JSONL: {id, messages} or {id, prompt}")
    s.add_argument("--output", required=True, help="run directory (resumable)")
    s.add_argument("--provider", default="openai", choices=["openai", "anthropic", "gemini"],
                   help="wire protocol (default: openai, any OpenAI-compatible server)")  # fmt: skip
    s.add_argument("--api-key-env", default=None, help="name of the env var holding the API key")
    s.add_argument("--key", action="append", default=None, metavar="VAR[@GROUP]",
                   help="one key of a pool: the env var holding it, @ the organisation whose quota it "
                        "shares (repeat; instead of --api-key-env)")  # fmt: skip
    s.add_argument(
        "--no-key-affinity",
        action="store_true",
        default=None,
        help="with --key: send each request to the freest key (no prompt-cache affinity)",
    )
    s.add_argument("--concurrency", type=COUNT, default=ENDPOINT_DEFAULTS["concurrency"],
                   help="requests in flight at once (default %(default)s)")  # fmt: skip
    s.add_argument("--rpm", type=RATE, default=None, help="requests per minute (default: learned from 429s)")
    s.add_argument("--tpm", type=RATE, default=None, help="tokens per minute (default: learned from 429s)")
    s.add_argument("--max-tokens", type=TOKENS, default=None, help="most tokens per completion")
    s.add_argument("--temperature", type=TEMP, default=0.0, help="sampling temperature (default 0)")
    s.add_argument("--n", type=checked(C.Choices), default=1, help="completions per input line (default 1)")
    s.add_argument("--seed", type=checked(C.Seed), default=None, help="seed sent with every request")
    s.add_argument("--timeout", type=SECONDS, default=ENDPOINT_DEFAULTS["timeout_s"],
                   help="deadline of one attempt, seconds (default %(default)s)")  # fmt: skip
    s.add_argument("--max-attempts", type=ATTEMPTS, default=ENDPOINT_DEFAULTS["max_attempts"],
                   help="attempts per request on 5xx, resets and timeouts (default %(default)s)")  # fmt: skip
    s.add_argument("--max-wait", type=SECONDS, default=ENDPOINT_DEFAULTS["max_wait_s"],
                   help="longest pause a server's Retry-After may impose, seconds")  # fmt: skip
    s.add_argument("--no-cache", action="store_true", help="no response cache (a rerun pays again)")
    s.add_argument("--compress", default=None, choices=["none", "zstd"],
                   help="zstd: sealed record and trace shards as *.jsonl.zst (~10x less disk)")  # fmt: skip
    s.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    s.add_argument("--metrics-port", type=PORT, default=None, help="serve Prometheus /metrics here")
    s.add_argument("--price-in", type=checked(C.Price), default=None, help="$ per 1M input tokens")
    s.add_argument("--price-out", type=checked(C.Price), default=None, help="$ per 1M output tokens")
    s.add_argument("--mode", default=None, choices=["online", "batch"],
                   help="batch: the provider's Batch API (half price, hours; resumable)")  # fmt: skip
    s.add_argument("--batch-linger", type=SECONDS, default=None, help="submit after this long idle, s")
    s.add_argument("--batch-max-items", type=COUNT, default=None, help="requests per batch at most")
    s.add_argument("--batch-max-open", type=COUNT, default=None, help="batches at the provider at once")
    s.add_argument("--batch-poll", type=SECONDS, default=None, help="seconds between status polls")
    s.add_argument("--batch-max-rounds", type=ATTEMPTS, default=None, help="batches an item may go through")
    s.add_argument("--batch-fallback", default=None, choices=["none", "online"],
                   help="after the last round: fail the record (none) or send it once online")  # fmt: skip
    s.add_argument("--batch-max-poll-failures", type=COUNT, default=None,
                   help="failed status polls in a row before the run stops naming the batch")  # fmt: skip
    s.add_argument("--batch-deadline", type=POSFLOAT, default=None,
                   help="seconds to wait for a submitted batch before the run stops naming it")  # fmt: skip
    add_ray_flags(s)
    add_loop_flag(s)


def _add_batches(sub: Any) -> None:
    """``fair batches``'s flags."""
    s = sub.add_parser("batches", help="a run's provider batches: list, attach a lost one, cancel")
    s.add_argument("action", choices=["list", "attach", "cancel"], help="what to do")
    s.add_argument("run_dir", help="the run directory whose batches these are")
    s.add_argument("ids", nargs="*", help="attach: LOCAL BATCH_ID; cancel: ids (default: all running)")


def _add_status(sub: Any) -> None:
    """``fair status``'s flags."""
    s = sub.add_parser("status", help="counts, cost and failures of a run, live or finished")
    s.add_argument("run_dir", help="a run directory of `fair run` or `fair generate`")


def _add_sim(sub: Any) -> None:
    """``fair sim``'s flags."""
    s = sub.add_parser("sim", help="the simulator as a standalone OpenAI-compatible server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=PORT, default=8900, help="port to listen on (default %(default)s)")
    s.add_argument("--profile", default="default", help="profile name or TOML file")
    s.add_argument("--dataset", default=None, help="dataset name for reasoning content")
    add_loop_flag(s)


def _add_serve_student(sub: Any) -> None:
    """``fair serve-student``'s flags."""
    s = sub.add_parser("serve-student", help="OpenAI-compatible student server (CPU, or vllm serve)")
    s.add_argument("--model", default=None, help="HF id or local path (default: SmolLM2-135M GGUF)")
    s.add_argument("--adapter", default=None, help="LoRA adapter folder, or NAME=DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=PORT, default=8001, help="port to listen on (default %(default)s)")
    s.add_argument("--max-batch", type=COUNT, default=16, help="CPU backend: sequences decoded together")
    s.add_argument("--backend", default="cpu", choices=["cpu", "vllm", "auto"],
                   help="vllm: `vllm serve` as a child process; auto: vllm when installed")  # fmt: skip
    add_vllm_flags(s)


def _add_train(sub: Any) -> None:
    """``fair train``'s flags."""
    s = sub.add_parser("train", help="LoRA distillation on run directories' samples")
    s.add_argument("inputs", nargs="+", help="run directories or a train TOML config")
    s.add_argument("--out", default=None, help="output folder (default: runs/train)")
    s.add_argument("--model", default=None, help="HF id or local path (default: the embedded SmolLM2)")
    s.add_argument("--max-steps", type=POS, default=None, help="optimizer steps (overrides --epochs)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    s.add_argument("--epochs", type=POS, default=None, help="passes over the samples (default 3)")
    s.add_argument(
        "--alpha", type=checked(C.Weight), default=None, help="weight of the mistake loss (default 0.5)"
    )
    s.add_argument("--lr", type=POSFLOAT, default=None, help="peak learning rate (default 2e-4)")
    s.add_argument("--batch-size", type=COUNT, default=None, help="examples per micro-batch")
    s.add_argument("--grad-accum", type=COUNT, default=None, help="micro-batches per optimizer step")
    s.add_argument(
        "--max-seq-len", type=TOKENS, default=None, help="tokens per example at most (default 1024)"
    )
    s.add_argument("--lora-rank", type=COUNT, default=None, help="LoRA rank r (default 16)")
    s.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    s.add_argument("--no-packing", action="store_true", help="padded batches instead of packed rows")
    s.add_argument(
        "--batching", default=None, choices=["mixed", "paired"], help="paired: the paper's two batches a step"
    )
    s.add_argument(
        "--seed", type=checked(C.Seed), default=None, help="seed of shuffling and init (default 0)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval(sub: Any) -> None:
    """``fair eval``'s flags."""
    s = sub.add_parser("eval", help="accuracy of base and trained students on the benchmarks")
    s.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    s.add_argument("--adapter", action="append", default=[], help="NAME=DIR, repeatable")
    s.add_argument("--datasets", default="svamp", help="comma list: gsm8k,svamp,strategyqa,logiqa")
    s.add_argument("--limit", type=POS, default=None, help="questions per dataset at most")
    s.add_argument("--out", default="runs/eval", help="report folder (default %(default)s)")
    s.add_argument("--split", default="test", help="split to score (default %(default)s)")
    s.add_argument(
        "--allow-overlap",
        action="store_true",
        help="score even questions the trained model saw in training (said in bold in the report)",
    )
    s.add_argument("--no-base", action="store_true", help="evaluate the adapters only")
    s.add_argument("--batch-size", type=COUNT, default=16, help="questions generated together")
    s.add_argument("--max-new-tokens", type=TOKENS, default=384, help="answer length limit (default 384)")
    s.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm"],
                   help="auto: vLLM when installed, else transformers")  # fmt: skip
    add_vllm_flags(s)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_export(sub: Any) -> None:
    """``fair export``'s flags."""
    s = sub.add_parser("export", help="samples in TRL / ShareGPT / LLaMA-Factory / axolotl format")
    s.add_argument("run_dir", help="a finished run directory")
    s.add_argument("--format", required=True, choices=["trl", "sharegpt", "llamafactory", "axolotl"],
                   help="the training stack to write for")  # fmt: skip
    s.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export/FORMAT)")


def _add_repair(sub: Any) -> None:
    """``fair repair``'s flags."""
    s = sub.add_parser("repair", help="make a damaged run directory readable and resumable again")
    s.add_argument("run_dir", help="the run directory a command called damaged")


def _add_bench(sub: Any) -> None:
    """``fair bench``'s flags."""
    s = sub.add_parser("bench", help="benchmarks; --json prints one JSON object as the last line")
    s.add_argument(
        "name", help="throughput | pipeline | train | serve | replay-svamp | batch | scale | rundir | keys"
    )
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.add_argument("--quick", action="store_true", help="a smaller, faster version")
    s.add_argument(
        "rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (fair bench NAME --help)"
    )


def _add_init(sub: Any) -> None:
    """``fair init``'s flags."""
    s = sub.add_parser("init", help="write a commented starter config for `fair run`")
    s.add_argument("path", help="the TOML file to write, e.g. job.toml")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--sim", action="store_true", help="the simulator's committee (the default)")
    which.add_argument("--providers", metavar="LIST", default=None,
                       help="real teachers, a comma list of openai, anthropic, gemini")  # fmt: skip
    s.add_argument(
        "--port", type=PORT, default=8900, help="--sim: the simulator's port (default %(default)s)"
    )
    s.add_argument("--force", action="store_true", help="overwrite PATH if it exists")


COMMANDS = (
    _add_demo,
    _add_run,
    _add_generate,
    _add_batches,
    _add_status,
    _add_sim,
    _add_serve_student,
    _add_train,
    _add_eval,
    _add_export,
    _add_repair,
    _add_bench,
    _add_init,
)  # in the order `fair --help` lists them


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fair")  # description, epilog and examples: engine.clihelp
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return clihelp.finish(p)


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and map every outcome to one line and an exit code (see the docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    module, func = HANDLERS[args.command].split(":")
    try:
        check_flags(args)  # a flag that does not apply: exit 2 (engine.flagcheck)
        use_loop(getattr(args, "loop", "asyncio"))
        handler = getattr(importlib.import_module(module), func)
        return int(handler(args) or 0)
    except ConfigError as exc:
        return _say(f"config error: {exc}", 2)
    except UsageError as exc:
        return _say(str(exc), 2)
    except AbortRun as exc:
        return _say(f"aborted: {exc}", exc.exit_code)
    except FairError as exc:
        return _say(str(exc), 1)
    except KeyboardInterrupt:
        return _say("interrupted", 130)
    except BrokenPipeError:  # `fair status RUN | head`: the reader left; nothing to say, nowhere
        return _pipe_closed()
    except ModuleNotFoundError as exc:  # an optional extra not installed: say which (engine.extras)
        hint = missing_extra(exc, args.command)
        return _say(hint, 2) if hint else _crash(exc)
    except OSError as exc:
        if isinstance(exc, socket.gaierror):  # `--host` a resolver does not know
            return _say(f"cannot resolve the host to listen on: {exc.strerror or exc} (check --host)", 2)
        if exc.errno in USER_ERRNOS or (exc.errno is None and isinstance(exc, USER_OSERRORS)):
            where = f"{exc.filename}: " if exc.filename else ""
            return _say(f"{where}{exc.strerror or exc}", 2)
        return _crash(exc)
    except Exception as exc:
        return _crash(exc)


def _pipe_closed() -> int:
    """Quiet exit 141 (128 + SIGPIPE, as `yes | head` ends) once stdout's reader has gone; stdout
    is pointed at /dev/null so the interpreter's last flush cannot complain either."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _say(message: str, code: int) -> int:
    print(f"fair: {one_line(message)}", file=sys.stderr)
    return code


def _crash(exc: BaseException) -> int:
    """A bug: one line and the log file with the traceback (inline with FAIR_DEBUG=1); exit 70."""
    text = "".join(traceback.format_exception(exc))
    summary = f"internal error: {type(exc).__name__}: {exc}"
    if os.environ.get("FAIR_DEBUG", "") not in ("", "0"):
        sys.stderr.write(text)
        return _say(summary, 70)
    log = crash_log(text)
    where = f"the traceback is in {log}" if log else "run with FAIR_DEBUG=1 for the traceback"
    return _say(f"{summary} ({where}; please report it)", 70)


def crash_log(text: str) -> Path | None:
    """Write ``text`` under $XDG_CACHE_HOME/fair/logs (else ~/.cache, else the temp dir)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (Path(base) / "fair" / "logs", Path(tempfile.gettempdir()) / "fair-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"fair {' '.join(sys.argv[1:])}\n{text}")
            return path
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
