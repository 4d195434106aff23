"""``fair generate``: one process, or Ray (``--ray``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fairdistill.engine.config import check_output_dir
from fairdistill.engine.generate import generate, generate_outcome
from fairdistill.engine.launch.finish import finish_run
from fairdistill.engine.options import GenerateOptions, Outcome
from fairdistill.engine.scale import check_ray


def launch_generate(opts: GenerateOptions) -> int:
    """Run the generation the options describe and end it (``finish_run``); the exit code."""
    check_output_dir(opts.output, "--output")
    check_ray(opts.ray, batch=opts.endpoint.mode == "batch")
    return finish_run(_mode(opts))


def _mode(opts: GenerateOptions) -> Outcome:
    if opts.ray is not None:  # scale-out: imports ray only now
        from fairdistill.engine.scale.gen import run_generate

        return run_generate(opts, opts.ray)
    summary = asyncio.run(generate_run(opts))
    return generate_outcome(
        opts.output,
        summary,
        f"fair: {summary['records']} records in {opts.output}/responses "
        f"({summary['ok']} new ok, {summary['skipped_existing']} already there) "
        f"in {summary['elapsed_s']:.1f}s",
    )


async def generate_run(opts: GenerateOptions) -> dict[str, Any]:
    """One process (``engine.generate.generate``) on the options; the manifest's summary."""
    return await generate(
        opts.input,
        opts.output,
        opts.endpoint,
        max_tokens=opts.request.max_tokens,
        temperature=opts.request.temperature,
        n=opts.request.n,
        seed=opts.request.seed,
        cache=opts.cache,
        progress=opts.progress,
        metrics_port=opts.metrics_port,
        compress=opts.compress,
    )
