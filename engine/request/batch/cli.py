"""``fair batches list|attach|cancel RUN_DIR``: the batches a run has at its providers.

    fair batches list RUN_DIR                  one line per batch from the journal (state, ids, the
                                               variable of the key that made it)
    fair batches attach RUN_DIR LOCAL BATCH_ID the provider batch LOCAL's lost create made: the next
                                               run re-attaches to it instead of creating another
    fair batches cancel RUN_DIR [ID ...]       cancel running batches (all, or these local/provider
                                               ids) at the provider; their items are not paid for

``cancel`` reads the endpoint's base URL and the *name* of its key variable from the journal and
the key from the environment. Cancelling a batch whose create never answered readably (no provider
id) forgets it: a rerun no longer waits for it. Exit 2 for a run directory without a journal or an
unknown id; 1 when the provider did not cancel one of them (each named on one line: the command
ran, that batch is still there, try again); 3 when it refused the credentials. Everything the
journal or a provider holds is printed through ``engine.errors.one_line`` (no raw control bytes).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import aiohttp
import msgspec

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import ConfigError, UsageError, one_line
from fairdistill.engine.request.batch.anthropic import AnthropicBatchWire
from fairdistill.engine.request.batch.gemini import GeminiBatchWire
from fairdistill.engine.request.batch.journal import BatchInfo, Journal
from fairdistill.engine.request.batch.openai import OpenAIBatchWire
from fairdistill.engine.request.batch.wire import BatchWire, ControlError, checked
from fairdistill.engine.request.providers import make_provider


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


async def _cancel(infos: list[BatchInfo], j: Journal) -> tuple[list[str], int]:
    """Cancel each batch at its provider: the lines to print, and how many the provider did not
    cancel (each said on stderr)."""
    wires: dict[str, type[BatchWire]] = {
        "openai": OpenAIBatchWire,
        "anthropic": AnthropicBatchWire,
        "gemini": GeminiBatchWire,
    }
    done, failed = [], 0
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
        endpoint = msgspec.convert(
            {"provider": b.provider, "base_url": b.base_url, "model": "x"}, EndpointConfig
        )
        headers = make_provider(endpoint).headers(key)
        headers.pop("Content-Type", None)
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as s:
            try:
                remote = await wires[b.provider](s, b.base_url, key, b.lane).cancel(b.id)
            except ControlError as exc:
                failed += 1
                print(f"fair batches: not canceled: {one_line(f'{b.local} {b.id}: {exc}')}", file=sys.stderr)
                continue
        j.write("canceled", b.local)
        done.append(one_line(f"{b.local} {b.id} {remote.status}"))
    return done, failed


def cli_main(args: Any) -> int:
    j = _journal(args.run_dir)
    if args.action == "list":
        for b in j.batches.values():
            flag = " canceled" if b.canceled else ""
            cells = [b.local, b.lane, b.state + flag, b.id or "-", f"{b.n} requests", b.status or "-"]
            if b.key_env:  # the variable of the key that made it (never the key)
                cells.append(f"key {b.key_env}")
            print("\t".join(one_line(c, 200) for c in cells))
        return 0
    if args.action == "attach":
        return _attach(j, args.ids)
    return _cancel_cmd(j, args.ids)


def _attach(j: Journal, ids: list[str]) -> int:
    """``fair batches attach RUN_DIR LOCAL BATCH_ID``: the journal records the provider batch."""
    if len(ids) != 2:
        raise UsageError("fair batches attach RUN_DIR LOCAL BATCH_ID: give the local id and the provider's")
    b = _pick(j, ids[0])
    try:  # Gemini's resource name: batches/ID; it goes into URLs: a plain id only
        bid = checked(ids[1].removeprefix("batches/"), "", "batch")
    except ControlError:
        raise UsageError(f"BATCH_ID {one_line(repr(ids[1]), 100)} is not a provider batch id") from None
    if b.id and b.id != bid:
        raise UsageError(f"batch {b.local} is already {b.state} as {one_line(b.id, 100)}")
    j.write("submitted", b.local, id=bid)
    print(f"fair batches: {one_line(b.local)} attached to {bid}; run the same command again to collect it")
    return 0


def _cancel_cmd(j: Journal, ids: list[str]) -> int:
    """``fair batches cancel RUN_DIR [ID ...]``: exit 0, or 1 when a cancel failed at the provider."""
    running = [b for b in j.batches.values() if b.state == "submitted" and not b.canceled]
    if ids:
        running = [_pick(j, i) for i in ids]
        for b in running:
            if b.state == "creating" and not b.id:  # no provider id to cancel: forget it
                j.write("canceled", b.local)
                print(f"fair batches: forgot {one_line(b.local)} (no provider batch known for it)")
    else:
        for b in j.batches.values():
            if b.state == "creating":
                print(
                    f"fair batches: {one_line(b.local)} was being created when the run stopped: run it "
                    "again to find the provider batch, then cancel it (or `fair batches cancel RUN_DIR "
                    f"{one_line(b.local)}` to forget it)",
                    file=sys.stderr,
                )
    done, failed = asyncio.run(_cancel(running, j))
    for line in done:
        print(f"fair batches: canceled {line}")
    return 1 if failed else 0
