"""Live counters per endpoint: ``EndpointStats``, kept by ``StatsObserver`` from the request
events (``engine.request.events``). Read by ``Engine.snapshot()`` (the manifest's ``endpoints``), the
Prometheus collector (``engine.request.metrics``) and ``fair status``."""

from __future__ import annotations

import msgspec

from fairdistill.engine.request.events import Call, Observer
from fairdistill.engine.types import Completion


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

    def answered(self, call: Call) -> None:
        s = self.by_endpoint[call.endpoint]
        s.in_flight -= 1
        if call.timed_out:
            s.timeouts += 1

    def throttled(self, call: Call) -> None:
        self.by_endpoint[call.endpoint].http_429 += 1

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

    def failed(self, call: Call, error: BaseException) -> None:
        self.by_endpoint[call.endpoint].errors += 1
