"""Totals of the call trace, saved per sealed trace shard so ``fair status`` sums them.

``fair status`` reports calls, dollars, tokens and latency from every trace line; at 1M calls
reading the trace costs seconds. ``engine.request.trace.Trace`` adds each line to a
``TraceTotals`` as it writes it and, when it seals a shard, saves them beside the run's other
caches of what shards say::

    RUN_DIR/index/trace/<shard file name>.json   {"bytes", "sha256", "totals"}

A saved total counts only while its shard on disk has that size and sha256 (the shard's lines
were written from ``TraceEvent`` values, so they are whole): a shard edited, repaired, or sealed
without totals (a kill, then a resume) is read line by line by the rules of
``engine.rundir.reader``, which also judge its damage. Deleting ``index/`` is always safe.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from fairdistill.engine.rundir.reader import decode_line, record_decoder, sha256, shard_lines

FOLDER = Path("index") / "trace"
_KINDS = ("prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens", "reasoning_tokens")


class TracedCall(Protocol):
    """What a total reads of a line: ``TraceEvent`` (writing) and ``schema.TraceLine`` (reading)."""

    @property
    def endpoint(self) -> str: ...

    @property
    def latency_s(self) -> float | None: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def reasoning_tokens(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    @property
    def cache_write_tokens(self) -> int: ...

    @property
    def cost_usd(self) -> float: ...

    @property
    def attempts(self) -> int: ...

    @property
    def http_429(self) -> int: ...

    @property
    def cache_hit(self) -> bool: ...

    @property
    def key(self) -> Any: ...  # a pool key's variable (unset or None: one key)

    @property
    def refused(self) -> Any: ...  # pool keys' variables retired on it (unset or empty: none)


def _latency_key(x: float) -> float:
    """A latency to 3 significant digits: the median comes from a histogram of a few thousand
    keys at most, whatever the number of calls."""
    if x <= 0 or not math.isfinite(x):
        return 0.0
    return round(x, 2 - math.floor(math.log10(x)))


# the sums kept per (endpoint, stage) row, in this order; reasoning is part of completion, cached
# and cache writes of prompt
_SUMS = ("calls", "http_429", "retries", "cost_usd", *_KINDS)
# the sums kept per (endpoint, pool key) row: the calls a key served (their 429s, tokens and
# dollars) and the 401/403s that retired it
_KEY_SUMS = ("calls", "http_429", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
             "refused")  # fmt: skip


class TraceTotals:
    """Call counts, dollars, tokens, a latency histogram, dollars per endpoint and stage, and
    the tokens as billed per endpoint, of any number of trace lines (``add``, ``merge``): sums
    per (endpoint, stage), so adding a line is a few list additions (it runs once per call); and
    per (endpoint, key) for the lines of an endpoint with a key pool."""

    __slots__ = ("cache_hits", "keys", "latency", "lines", "rows")

    def __init__(self) -> None:
        self.lines = 0
        self.cache_hits = 0
        self.rows: dict[tuple[str, str], list[Any]] = {}  # (endpoint, stage) -> sums as _SUMS
        self.latency: dict[float, int] = {}  # latency to 3 significant digits -> calls
        self.keys: dict[tuple[str, str], list[Any]] = {}  # (endpoint, key variable) -> as _KEY_SUMS

    def add(self, t: TracedCall, stage: str | None) -> None:
        """Count one trace line (``stage``: what the call was for, None when not said)."""
        self.lines += 1
        if t.cache_hit:
            self.cache_hits += 1
            return
        key = (t.endpoint, stage or "other")
        r = self.rows.get(key)
        if r is None:
            r = self.rows[key] = [0, 0, 0, 0.0, 0, 0, 0, 0, 0]
        r[0] += 1
        r[1] += t.http_429
        r[2] += max(0, t.attempts - 1)
        r[3] += t.cost_usd
        r[4] += t.prompt_tokens
        r[5] += t.cached_tokens
        r[6] += t.cache_write_tokens
        r[7] += t.completion_tokens
        r[8] += t.reasoning_tokens
        if t.latency_s is not None:
            k = _latency_key(t.latency_s)
            self.latency[k] = self.latency.get(k, 0) + 1
        if t.key or t.refused:
            self._add_key(t)

    def _add_key(self, t: TracedCall) -> None:
        """Count a pool call against the key that served it and the keys it retired."""
        if t.key:
            r = self._key_row(t.endpoint, t.key)
            r[0] += 1
            r[1] += t.http_429
            r[2] += t.prompt_tokens
            r[3] += t.cached_tokens
            r[4] += t.completion_tokens
            r[5] += t.cost_usd
        for env in t.refused or ():
            self._key_row(t.endpoint, env)[6] += 1

    def _key_row(self, endpoint: str, env: str) -> list[Any]:
        r = self.keys.get((endpoint, env))
        if r is None:
            r = self.keys[(endpoint, env)] = [0, 0, 0, 0, 0, 0.0, 0]
        return r

    def merge(self, other: TraceTotals) -> None:
        self.lines += other.lines
        self.cache_hits += other.cache_hits
        for key, sums in other.rows.items():
            mine = self.rows.setdefault(key, [0, 0, 0, 0.0, 0, 0, 0, 0, 0])
            for i, v in enumerate(sums):
                mine[i] += v
        for k, n in other.latency.items():
            self.latency[k] = self.latency.get(k, 0) + n
        for key, sums in other.keys.items():
            mine = self._key_row(*key)
            for i, v in enumerate(sums):
                mine[i] += v

    @property
    def calls(self) -> collections.Counter[str]:
        """calls (not from the cache), cache_hits, http_429, retries."""
        c: collections.Counter[str] = collections.Counter(cache_hits=self.cache_hits)
        for r in self.rows.values():
            c.update(calls=r[0], http_429=r[1], retries=r[2])
        return c

    @property
    def cost(self) -> float:
        return sum(r[3] for r in self.rows.values())

    @property
    def tokens(self) -> int:
        return sum(r[4] + r[7] for r in self.rows.values())

    @property
    def spent(self) -> dict[str, collections.Counter[Any]]:
        """Dollars by endpoint, then by stage."""
        out: dict[str, collections.Counter[Any]] = collections.defaultdict(collections.Counter)
        for (endpoint, stage), r in self.rows.items():
            out[endpoint][stage] += r[3]
        return out

    @property
    def billed(self) -> dict[str, collections.Counter[Any]]:
        """Tokens by kind (and ``cost_usd``) by endpoint, as billed."""
        out: dict[str, collections.Counter[Any]] = collections.defaultdict(collections.Counter)
        for (endpoint, _), r in self.rows.items():
            b = out[endpoint]
            for name, v in zip(_KINDS, r[4:], strict=True):
                b[name] += v
            b["cost_usd"] += r[3]
        return out

    @property
    def by_key(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per endpoint with a key pool, per key variable: calls served, 429s, tokens, dollars,
        the share of its input tokens read from the provider's cache, and whether it was retired."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (endpoint, env), r in sorted(self.keys.items()):
            row = dict(zip(_KEY_SUMS, r, strict=True))
            row["cached_share"] = r[3] / r[2] if r[2] else None
            row["retired"] = r[6] > 0
            out.setdefault(endpoint, {})[env] = row
        return out

    def latency_p50(self) -> float | None:
        """The median latency (to 3 significant digits), None without any."""
        return _median(self.latency) if self.latency else None

    def as_json(self) -> dict[str, Any]:
        rows = [[endpoint, stage, *sums] for (endpoint, stage), sums in self.rows.items()]
        keys = [[endpoint, env, *sums] for (endpoint, env), sums in self.keys.items()]
        return {"lines": self.lines, "cache_hits": self.cache_hits, "sums": _SUMS, "rows": rows,
                "latency": sorted(self.latency.items()), "key_sums": _KEY_SUMS, "keys": keys}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceTotals:
        """Totals saved by ``as_json``; ``ValueError``/``TypeError``/``KeyError`` when not that."""
        if tuple(d["sums"]) != _SUMS:
            raise ValueError("saved by another version")
        t = cls()
        t.lines, t.cache_hits = int(d["lines"]), int(d["cache_hits"])
        for endpoint, stage, *sums in d["rows"]:
            if len(sums) != len(_SUMS) or not all(isinstance(v, int | float) for v in sums):
                raise ValueError("not sums")
            t.rows[(str(endpoint), str(stage))] = sums
        for k, n in d["latency"]:
            t.latency[float(k)] = int(n)
        if "keys" in d:  # saved before key pools: that trace had no pool key
            if tuple(d["key_sums"]) != _KEY_SUMS:
                raise ValueError("saved by another version")
            for endpoint, env, *sums in d["keys"]:
                if len(sums) != len(_KEY_SUMS) or not all(isinstance(v, int | float) for v in sums):
                    raise ValueError("not sums")
                t.keys[(str(endpoint), str(env))] = sums
        return t


def _median(hist: dict[float, int]) -> float:
    """The median of a histogram (the mean of the two middle values for an even count)."""
    n = sum(hist.values())
    keys = sorted(hist)
    lo_rank, hi_rank = (n - 1) // 2, n // 2
    seen, lo = 0, None
    for k in keys:
        seen += hist[k]
        if lo is None and seen > lo_rank:
            lo = k
        if seen > hi_rank:
            return (lo + k) / 2 if lo is not None else k
    raise AssertionError("unreachable: ranks are below the count")


def saved_path(root: Path, shard: Path) -> Path:
    return root / FOLDER / f"{shard.name}.json"


def save(root: Path, shard: Path, totals: TraceTotals) -> None:
    """Save ``totals`` of the sealed trace shard ``shard``, sealed with its size and sha256
    (a temporary file and a rename: a reader sees the whole file or none)."""
    path = saved_path(root, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"bytes": shard.stat().st_size, "sha256": sha256(shard), "totals": totals.as_json()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(data))
    tmp.replace(path)


def saved(root: Path, shard: Path, digests: dict[str, str] | None = None) -> TraceTotals | None:
    """The saved totals of ``shard`` when they still describe it (same size and sha256), else
    None: a ``.partial``, a missing, stale or unreadable file. ``digests``: sha256s computed
    already, by path relative to ``root`` (filled in)."""
    if shard.name.endswith(".partial"):
        return None
    try:
        data = orjson.loads(saved_path(root, shard).read_bytes())
        if data["bytes"] != shard.stat().st_size:
            return None
        rel = str(shard.relative_to(root))
        digest = digests.get(rel) if digests is not None else None
        if digest is None:
            digest = sha256(shard)
            if digests is not None:
                digests[rel] = digest
        if data["sha256"] != digest:
            return None
        return TraceTotals.from_json(data["totals"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def read_totals(root: Path, shards: list[Path], digests: dict[str, str] | None = None) -> TraceTotals:
    """The totals of ``shards`` (trace shards of ``root``): saved ones where they still hold,
    the others read line by line (an unreadable line: ``DamagedRunError`` naming it)."""
    total = TraceTotals()
    for path in shards:
        got = saved(root, path, digests)
        if got is None:
            got = TraceTotals()
            for t in _lines(root, path):
                got.add(t, t.stage)
        total.merge(got)
    return total


def _lines(root: Path, path: Path) -> Iterator[Any]:
    decoder = record_decoder("trace")
    for n, line in shard_lines(root, path):
        yield decode_line(root, path, n, line, decoder)
