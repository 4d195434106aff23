"""Live counters per endpoint: ``EndpointStats``, kept by ``StatsObserver`` from the request
events (``engine.request.events``). Read by ``Engine.snapshot()`` (the manifest's ``endpoints``), the
Prometheus collector (``engine.request.metrics``) and ``fair status``.

An endpoint with a key pool also has ``KeyStats`` per key, by the key's VARIABLE name (never its
value) in ``EndpointStats.keys``: what went out with that key and how it was answered. A call is
counted against the key of its try (``Call.key_env``); a key that refused the credentials (401/403,
or the provider's own word for it: ``Call.refused``) is retired by the pool at the first
(``retired``)."""

from __future__ import annotations

import msgspec

from fairdistill.engine.request.events import Call, Observer
from fairdistill.engine.types import Completion


class KeyStats(msgspec.Struct):
    """Live counters of one key of a pool (its tries, their answers, the tokens it was billed)."""

    calls: int = 0  # HTTP calls sent with it (429s and retries included)
    ok: int = 0  # calls completed on it
    errors: int = 0  # calls that failed for good on it
    http_429: int = 0
    refused: int = 0  # 401/403 answers: the pool retired it at the first
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's cache (per organisation)
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retired: bool = False  # refused (401/403): the pool sends nothing more with it this run


class EndpointStats(msgspec.Struct):
    """Live counters of one endpoint (read by progress displays and written to the manifest)."""

    requests: int = 0  # complete() calls
    cache_hits: int = 0
    in_flight: int = 0  # HTTP calls sent and not yet answered
    ok: int = 0
    errors: int = 0  # complete() calls that failed for good
    http_429: int = 0
    retries: int = 0  # attempts after a failed one (5xx, reset, timeout, bad body)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # reasoning tokens included (billed as output)
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's cache (priced price_cached_in)
    cost_usd: float = 0.0
    calls: int = 0  # HTTP calls sent, 429s and retries included
    timeouts: int = 0
    keys: dict[str, KeyStats] = {}  # a key pool's counters, by variable name ({} for one key)

    def key(self, env: str) -> KeyStats:
        """The counters of pool key ``env`` (made at its first event)."""
        ks = self.keys.get(env)
        if ks is None:
            ks = self.keys[env] = KeyStats()
        return ks


class StatsObserver(Observer):
    """Keeps ``EndpointStats`` per endpoint from the request events."""

    def __init__(self, names: list[str]):
        self.by_endpoint = {name: EndpointStats() for name in names}

    def requested(self, call: Call) -> None:
        self.by_endpoint[call.endpoint].requests += 1

    def cached(self, call: Call, done: Completion) -> None:
        self.by_endpoint[call.endpoint].cache_hits += 1

    def sent(self, call: Call) -> None:
        s = self.by_endpoint[call.endpoint]
        s.calls += 1
        s.in_flight += 1
        if call.key_env is not None:
            s.key(call.key_env).calls += 1

    def answered(self, call: Call) -> None:
        s = self.by_endpoint[call.endpoint]
        s.in_flight -= 1
        if call.timed_out:
            s.timeouts += 1
        env = call.key_env  # this try's key refused the credentials (the attempt noted it)
        if env is not None and call.refused[-1:] == (env,) and call.status != 429:
            k = s.key(env)
            k.refused += 1
            k.retired = True

    def throttled(self, call: Call) -> None:
        s = self.by_endpoint[call.endpoint]
        s.http_429 += 1
        if call.key_env is not None:
            s.key(call.key_env).http_429 += 1

    def retried(self, call: Call) -> None:
        self.by_endpoint[call.endpoint].retries += 1

    def completed(self, call: Call, done: Completion) -> None:
        s = self.by_endpoint[call.endpoint]
        s.ok += 1
        s.prompt_tokens += done.usage.prompt_tokens
        s.completion_tokens += done.usage.completion_tokens
        s.reasoning_tokens += done.usage.reasoning_tokens
        s.cached_tokens += done.usage.cached_tokens
        s.cost_usd += done.cost_usd
        if call.key_env is not None:
            k = s.key(call.key_env)
            k.ok += 1
            k.prompt_tokens += done.usage.prompt_tokens
            k.cached_tokens += done.usage.cached_tokens
            k.completion_tokens += done.usage.completion_tokens
            k.cost_usd += done.cost_usd

    def failed(self, call: Call, error: BaseException) -> None:
        s = self.by_endpoint[call.endpoint]
        s.errors += 1
        if call.key_env is not None:
            s.key(call.key_env).errors += 1
