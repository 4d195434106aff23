"""The ``fair run`` / ``fair generate`` flags as typed options (part of the command layer).

``engine.cli`` dispatches here; each handler builds its options Struct once
(``engine.options``) and hands it to the launcher (``engine.launch``): nothing below sees the
argparse namespace.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fairdistill.engine.config import EndpointConfig, convert_flags
from fairdistill.engine.errors import ConfigError
from fairdistill.engine.launch.generate import launch_generate
from fairdistill.engine.launch.run import launch_run
from fairdistill.engine.options import PILOT, GenerateOptions, RayOptions, RequestOptions, RunOptions
from fairdistill.engine.request.providers import redact

ENDPOINT = "default"  # the one endpoint of `fair generate`

FLAGS = {"base_url": "--endpoint", "model": "--model", "concurrency": "--concurrency", "rpm": "--rpm",
         "tpm": "--tpm", "timeout_s": "--timeout", "max_attempts": "--max-attempts",
         "max_wait_s": "--max-wait", "price_in": "--price-in", "price_out": "--price-out", "mode": "--mode",
         "keys": "--key", "api_key_env": "--api-key-env",
         "batch.linger_s": "--batch-linger", "batch.max_items": "--batch-max-items",
         "batch.max_open": "--batch-max-open", "batch.poll_s": "--batch-poll",
         "batch.max_rounds": "--batch-max-rounds", "batch.fallback": "--batch-fallback",
         "batch.max_poll_failures": "--batch-max-poll-failures",
         "batch.deadline_s": "--batch-deadline"}  # fmt: skip


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """``--ray [ADDRESS] --workers N --block-size N``, or None without ``--ray``."""
    if args.ray is None:
        return None
    return RayOptions(args.ray, args.workers, args.block_size)


def run_options(args: argparse.Namespace) -> RunOptions:
    """``fair run CONFIG ...`` as ``RunOptions`` (the run dir defaults to runs/CONFIG_NAME)."""
    return RunOptions(
        config=Path(args.config),
        run_dir=Path(args.run_dir or Path("runs") / Path(args.config).stem),
        progress=not args.no_progress,
        metrics_port=args.metrics_port,
        estimate=args.estimate,
        pilot=args.pilot or PILOT,
        ray=ray_options(args),
    )


def batch_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--batch-*`` flags given, as an ``[endpoints.X.batch]`` table."""
    fields = ("linger_s", "max_items", "max_open", "poll_s", "max_rounds", "fallback", "max_poll_failures",
              "deadline_s")  # fmt: skip
    values = {f: getattr(args, "batch_" + f.removesuffix("_s"), None) for f in fields}
    return {f: v for f, v in values.items() if v is not None}


def key_flags(given: list[str] | None) -> list[dict[str, str]]:
    """``--key VAR[@GROUP]`` flags as a ``keys`` pool."""
    keys = []
    for flag in given or ():
        env, _, group = flag.partition("@")
        if redact(env) != env:
            raise ConfigError("--key takes the NAME of an environment variable, not the key itself")
        keys.append({"env": env, "group": group} if group else {"env": env})
    return keys


def endpoint_config(args: argparse.Namespace) -> EndpointConfig:
    """``fair generate``'s endpoint flags, checked as a TOML endpoint is (errors name the flag)."""
    if args.api_key_env and redact(args.api_key_env) != args.api_key_env:
        # never echo it back: the value looks like a key, not the name of a variable holding one
        raise ConfigError("--api-key-env takes the NAME of an environment variable, not the key itself")
    if args.api_key_env and args.key:
        raise ConfigError("give either --api-key-env (one key) or --key (a pool), not both")
    if (given := batch_flags(args)) and args.mode != "batch":
        names = ", ".join(FLAGS[f"batch.{f}"] for f in given)
        raise ConfigError(f"{names} apply only with --mode batch (add it, or drop them)")
    fields = {"provider": args.provider, "base_url": args.endpoint, "model": args.model,
              "api_key_env": args.api_key_env, "concurrency": args.concurrency, "rpm": args.rpm,
              "tpm": args.tpm, "timeout_s": args.timeout, "max_attempts": args.max_attempts,
              "max_wait_s": args.max_wait, "price_in": args.price_in, "price_out": args.price_out,
              "mode": args.mode, "batch": given, "name": ENDPOINT, "keys": key_flags(args.key),
              "key_affinity": not args.no_key_affinity}  # fmt: skip
    return convert_flags(fields, EndpointConfig, command="fair generate", flags=FLAGS)


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    """``fair generate ...`` as ``GenerateOptions``."""
    return GenerateOptions(
        input=Path(args.input),
        output=Path(args.output),
        endpoint=endpoint_config(args),
        request=RequestOptions(
            max_tokens=args.max_tokens, temperature=args.temperature, n=args.n, seed=args.seed
        ),
        cache=not args.no_cache,
        progress=not args.no_progress,
        metrics_port=args.metrics_port,
        compress=args.compress or "none",
        ray=ray_options(args),
    )


def run(args: argparse.Namespace) -> int:
    """``fair run``: the options, then the launcher."""
    return launch_run(run_options(args))


def generate(args: argparse.Namespace) -> int:
    """``fair generate``: the options, then the launcher."""
    return launch_generate(generate_options(args))
