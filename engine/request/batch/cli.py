"""``fair batches list|attach|cancel RUN_DIR``: the batches a run has at its providers.

    fair batches list RUN_DIR                  one line per batch from the journal (state, ids)
    fair batches attach RUN_DIR LOCAL BATCH_ID the provider batch LOCAL's lost create made: the next
                                               run re-attaches to it instead of creating another
    fair batches cancel RUN_DIR [ID ...]       cancel running batches (all, or these local/provider
                                               ids) at the provider; their items are not paid for

``cancel`` reads the endpoint's base URL and the *name* of its key variable from the journal and
the key from the environment. Exit 2 for a run directory without a journal or an unknown id.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp

from engine.errors import ConfigError, UsageError, one_line
from engine.request.batch.journal import BatchInfo, Journal
from engine.request.batch.wire import ControlError


def _journal(run_dir: str) -> Journal:
    j = Journal(run_dir)
    if not j.path.exists():
        raise UsageError(f"{run_dir}: no batches/journal.jsonl (this run used no Batch API)")
    return j


def list_batches(run_dir: str) -> list[BatchInfo]:
    return list(_journal(run_dir).batches.values())


def _pick(j: Journal, ident: str) -> BatchInfo:
    ident = ident.removeprefix("batches/")  # Gemini's resource name: batches/ID
    for b in j.batches.values():
        if ident in (b.local, b.id):
            return b
    raise UsageError(f"{j.path}: no batch {one_line(ident, 80)!r} (see `fair batches list`)")


async def _cancel(infos: list[BatchInfo], j: Journal) -> list[str]:
    import os

    from engine.request.batch.anthropic import AnthropicBatchWire
    from engine.request.batch.gemini import GeminiBatchWire
    from engine.request.batch.openai import OpenAIBatchWire
    from engine.request.providers import make_provider

    wires = {"openai": OpenAIBatchWire, "anthropic": AnthropicBatchWire, "gemini": GeminiBatchWire}
    done = []
    for b in infos:
        if not b.id or not b.base_url:
            continue
        if b.provider not in wires:
            raise UsageError(
                f"{j.path}: batch {b.local} has an unknown provider {one_line(b.provider, 40)!r}"
            )
        key = os.environ.get(b.key_env) if b.key_env else None
        if b.key_env and not key:
            raise ConfigError(f"environment variable {b.key_env} (the key of endpoint {b.lane!r}) is not set")
        from engine.config import EndpointConfig

        headers = make_provider(EndpointConfig(provider=b.provider, base_url=b.base_url, model="x")).headers(
            key
        )
        headers.pop("Content-Type", None)
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as s:
            try:
                remote = await wires[b.provider](s, b.base_url, key, b.lane).cancel(b.id)
            except ControlError as exc:
                print(f"fair batches: {b.id}: {exc}", file=sys.stderr)
                continue
        j.write("canceled", b.local)
        done.append(f"{b.local} {b.id} {remote.status}")
    return done


def cli_main(args: Any) -> int:
    j = _journal(args.run_dir)
    if args.action == "list":
        for b in j.batches.values():
            flag = " canceled" if b.canceled else ""
            print(f"{b.local}\t{b.lane}\t{b.state}{flag}\t{b.id or '-'}\t{b.n} requests\t{b.status or '-'}")
        return 0
    if args.action == "attach":
        if len(args.ids) != 2:
            raise UsageError(
                "fair batches attach RUN_DIR LOCAL BATCH_ID: give the local id and the provider's"
            )
        b = _pick(j, args.ids[0])
        bid = args.ids[1].removeprefix("batches/")  # Gemini's resource name: batches/ID
        if b.id and b.id != bid:
            raise UsageError(f"batch {b.local} is already {b.state} as {b.id}")
        j.write("submitted", b.local, id=bid)
        print(f"fair batches: {b.local} attached to {bid}; run the same command again to collect it")
        return 0
    running = [b for b in j.batches.values() if b.state == "submitted" and not b.canceled]
    for b in j.batches.values():
        if b.state == "creating":
            print(
                f"fair batches: {b.local} was being created when the run stopped: run it again to find the "
                "provider batch, then cancel it",
                file=sys.stderr,
            )
    if args.ids:
        running = [_pick(j, i) for i in args.ids]
    for line in asyncio.run(_cancel(running, j)):
        print(f"fair batches: canceled {line}")
    return 0
