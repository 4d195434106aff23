"""Call trace: one JSON line per API call in ``RUN_DIR/trace/shard-*.jsonl``.

Fields: ts (unix seconds), endpoint, model, latency_s, prompt/completion tokens (reasoning_tokens:
the thinking among the completion tokens; cached_tokens, cache_write_tokens: the cache reads and
writes among the prompt tokens), cost_usd,
attempts, http_429 (rate-limit answers before it went through), cache_hit, status (HTTP status
of the last attempt; 0 = no answer), error (the exception class of a failed call) and, only for
a call answered through a provider Batch API, batch (that batch's id); stage (what the call was
for: student, rationale, feedback, review) when the caller said; dropped (the parameters the
endpoint stopped sending after this call's 400 named them) when any; for an endpoint with a key
pool, key (the VARIABLE name of the key its last try went out with) and, when any answered it
401/403, refused (the variables of the keys retired on it). Never a key, a header or a message
body.

``TraceObserver`` turns request events (``engine.request.events``) into lines; ``Trace`` writes them
through the run store's ``ShardWriter``, buffered (64 KiB or once a second): the shard being
written is ``shard-NNNNN.jsonl.partial`` and is sealed (renamed) on close, like every shard. A
SIGKILL loses at most the last second of trace, never a record; the next ``Trace`` in that
folder seals the torn shard and opens a new one beside it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine.request.events import Call, Observer
from fairdistill.engine.rundir import tracesum
from fairdistill.engine.rundir.store import ShardWriter
from fairdistill.engine.rundir.tracesum import TraceTotals
from fairdistill.engine.types import Completion

SHARD_LINES = 1_000_000


class TraceEvent(msgspec.Struct, kw_only=True):
    ts: float
    endpoint: str
    model: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    http_429: int = 0
    cache_hit: bool = False
    status: int = 0
    error: str | None = None
    batch: str | msgspec.UnsetType = msgspec.UNSET  # omitted unless a Batch API answered
    stage: str | msgspec.UnsetType = msgspec.UNSET  # omitted unless the caller named one
    dropped: list[str] | msgspec.UnsetType = msgspec.UNSET  # omitted unless a 400 made it drop some
    key: str | msgspec.UnsetType = msgspec.UNSET  # a pool key's variable; omitted for one key
    refused: list[str] | msgspec.UnsetType = msgspec.UNSET  # pool keys retired on it (401/403)


class Trace:
    """Buffered JSONL writer of ``TraceEvent`` lines."""

    def __init__(self, folder: str | Path, writer: str = "", compress: str = "none"):
        """``compress = "zstd"``: a shard is compressed when sealed (``run.compress``)."""
        self.folder = Path(folder)
        self._shards = ShardWriter.resume(self.folder, writer, SHARD_LINES)
        self._shards.compress = compress
        self._shards.on_seal = self._sealed
        self.totals = TraceTotals()  # of the shard being written (engine.rundir.tracesum)
        self._encoder = msgspec.json.Encoder()
        self.lines = 0

    def __repr__(self) -> str:
        return f"Trace({str(self.folder)!r})"

    def write(self, event: TraceEvent) -> None:
        shards = self._shards
        self._encoder.encode_into(event, shards.pending, -1)
        shards.pending += b"\n"
        self.totals.add(event, event.stage or None)
        shards.append()
        self.lines += 1

    def _sealed(self, shard: Path) -> None:
        """Save the totals of the shard just sealed, so ``fair status`` need not read it; a
        failure to save only means it will be read."""
        totals, self.totals = self.totals, TraceTotals()
        with contextlib.suppress(OSError):
            tracesum.save(self.folder.parent, shard, totals)

    def flush(self) -> None:
        self._shards.flush()

    def close(self) -> None:
        self._shards.seal()


class TraceObserver(Observer):
    """One trace line per call that ended: answered from cache, completed or failed."""

    def __init__(self, trace: Trace):
        self.trace = trace

    def _write(self, call: Call, **fields: Any) -> None:
        """One line for ``call``: now, its endpoint, model and stage, and ``fields``."""
        self.trace.write(
            TraceEvent(
                ts=time.time(),
                endpoint=call.endpoint,
                model=call.model,
                stage=call.stage or msgspec.UNSET,
                **fields,
            )
        )

    def _sent(self, call: Call, **fields: Any) -> None:
        """``_write`` for a call that went out: its attempts, 429s, last status and batch too."""
        self._write(
            call,
            attempts=call.attempts,
            http_429=call.http_429,
            status=call.status,
            batch=call.batch or msgspec.UNSET,
            dropped=list(call.dropped) or msgspec.UNSET,
            key=call.key_env or msgspec.UNSET,
            refused=list(call.refused) or msgspec.UNSET,
            **fields,
        )

    def cached(self, call: Call, done: Completion) -> None:
        self._write(
            call,
            latency_s=0.0,
            **_tokens(done),
            attempts=0,
            cache_hit=True,
            status=200,
        )

    def completed(self, call: Call, done: Completion) -> None:
        """The line of every answered call (``_sent`` spelled out: one per record, the hot path)."""
        u = done.usage
        self.trace.write(
            TraceEvent(
                ts=time.time(),
                endpoint=call.endpoint,
                model=call.model,
                stage=call.stage or msgspec.UNSET,
                attempts=call.attempts,
                http_429=call.http_429,
                status=call.status,
                batch=call.batch or msgspec.UNSET,
                dropped=list(call.dropped) or msgspec.UNSET,
                key=call.key_env or msgspec.UNSET,
                refused=list(call.refused) or msgspec.UNSET,
                latency_s=round(done.latency_s, 6),
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                reasoning_tokens=u.reasoning_tokens,
                cached_tokens=u.cached_tokens,
                cache_write_tokens=u.cache_write_tokens,
                cost_usd=done.cost_usd,
            )
        )

    def failed(self, call: Call, error: BaseException) -> None:
        self._sent(call, latency_s=round(call.elapsed_s, 6), error=type(error).__name__)


def _tokens(done: Completion) -> dict[str, int]:
    u = done.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "cached_tokens": u.cached_tokens,
        "cache_write_tokens": u.cache_write_tokens,
    }
