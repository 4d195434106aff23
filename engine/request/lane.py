"""One endpoint at run time (``Lane``), and the pieces of a call that the online engine
(``engine.request.client.Engine``) and the streaming batch feed (``engine.request.batch.feed``)
share, so each exists once: the executor's ``Target``, pricing, the error for a reply that is
not a success, cache-hit marking and the end of a successful call (cost, latency, events).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AuthError, RequestError, one_line
from fairdistill.engine.request.admission import Admission
from fairdistill.engine.request.events import Call, Events
from fairdistill.engine.request.executor import BatchTarget, Target
from fairdistill.engine.request.keypool import KeyPool
from fairdistill.engine.request.pricing import Prices
from fairdistill.engine.request.providers import Provider, error_message, make_provider
from fairdistill.engine.request.providers.status import Verdict, classify
from fairdistill.engine.request.retry import RetryPolicy, Transient
from fairdistill.engine.types import ChatRequest, Completion, Usage

EST_MAX_TOKENS = 256  # completion tokens assumed for admission when max_tokens is not set


class Admitter(Protocol):
    """What the engine needs of an admission (``engine.request.admission.Admission`` is the local one)."""

    async def acquire(self, est_tokens: float = 0.0, affinity: int = 0) -> Any: ...

    def release(
        self,
        lease: Any,
        status: int,
        headers: Mapping[str, str] | None = None,
        used_tokens: float | None = None,
    ) -> None: ...

    def effective_rpm(self) -> float | None: ...

    def key_of(self, lease: Any) -> int:
        """The index of the key (in ``Lane.targets``) the call of ``lease`` goes out with."""
        ...

    def retire(self, lease: Any) -> tuple[bool, int]:
        """The key of ``lease`` was refused (401/403): (whether this retired it, keys left)."""
        ...


class Lane:
    """Everything about one endpoint at run time. Its repr never shows a key."""

    __slots__ = (
        "admission", "cache_model", "cfg", "key", "name", "policy", "prices", "provider", "secrets", "target",
        "targets",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        cfg: EndpointConfig,
        admission: Admitter | None = None,
        policy: RetryPolicy | None = None,
    ):
        self.name = name
        self.cfg = cfg
        self.provider: Provider = make_provider(cfg)
        if admission is None:
            admission = KeyPool(cfg) if cfg.pooled else Admission(cfg.concurrency, cfg.rpm, cfg.tpm)
        self.admission: Admitter = admission
        self.policy = policy if policy is not None else RetryPolicy(cfg.max_attempts)
        factor = cfg.batch.price_factor if cfg.mode == "batch" else 1.0  # Batch APIs bill less
        self.prices = Prices.of(cfg, factor)
        # the model as the cache keys it: its reasoning controls change the answer, so they are part
        # of it (an endpoint without them keeps the keys it always had)
        self.cache_model = cfg.model
        if cfg.reasoning is not None:
            self.cache_model += "|reasoning=" + msgspec.json.encode(cfg.reasoning).decode()
        self.key: str | None = None  # the one key (the first of a pool)
        self.secrets: tuple[str, ...] = ()  # every key, masked out of every message
        self.targets = self._targets({})
        self.target = self.targets[0]

    @property
    def pooled(self) -> bool:
        return self.cfg.pooled

    def open(self) -> tuple[Target, ...]:
        """Read the keys from the environment (``ConfigError``, exit 2, when one is missing) and
        build the executor's targets with them: one, or one per key of a pool."""
        cfg = self.cfg
        if cfg.pooled:
            values = {env: cfg.key_value(env) for env in cfg.key_envs()}
        else:
            key = cfg.api_key()
            values = {cfg.api_key_env: key} if cfg.api_key_env and key else {}
        self.secrets = tuple(values.values())
        self.key = self.secrets[0] if self.secrets else None
        self.targets = self._targets(values)
        self.target = self.targets[0]
        return self.targets

    def _targets(self, values: Mapping[str, str]) -> tuple[Target, ...]:
        cfg = self.cfg
        envs: list[str | None] = list(cfg.key_envs()) or [None]
        return tuple(self._target(env, values.get(env) if env else None) for env in envs)

    def _target(self, env: str | None, key: str | None) -> Target:
        cfg = self.cfg
        batch = None
        if cfg.mode == "batch":
            batch = BatchTarget(cfg.provider, cfg.base_url, cfg.model, env, cfg.batch)
        return Target(
            endpoint=self.name,
            url=self.provider.url,
            headers={**self.provider.headers(key), **cfg.headers},
            timeout_s=cfg.timeout_s,
            concurrency=cfg.concurrency,
            secret=key,
            batch=batch,
            key_env=env,
            pooled=cfg.pooled,
        )

    @property
    def price_in(self) -> float:
        return self.prices.input

    @property
    def price_out(self) -> float:
        return self.prices.output

    def cost(self, u: Usage) -> float:
        """Dollars of one reply's usage: cached and cache-write tokens at their own prices."""
        return self.prices.cost(u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.cache_write_tokens)

    def send_key(self, key: str) -> str:
        """The executor's name for a request: ``key``, or once a parameter was dropped a key of
        its own (a Batch API then treats the resend as a new item, not as the refused one)."""
        if not self.provider.dropped:
            return key
        head, sep, part = key.partition("-")
        h = hashlib.blake2b(f"{head}|{','.join(self.provider.dropped)}".encode(), digest_size=32)
        return h.hexdigest() + sep + part

    def failure(self, status: int, raw: bytes) -> RequestError:
        """The record's error for a reply the server refused (``Verdict.FAIL``)."""
        message = f"endpoint {self.name!r}: HTTP {status}: {error_message(raw, self.secrets)}"
        return RequestError(message, status=status, endpoint=self.name)

    def refusal(self, status: int, raw: bytes) -> Exception:
        """The error for a non-2xx, non-429 reply, by the one status table (``providers.status``)."""
        verdict = classify(status, raw)
        if verdict is Verdict.ABORT:
            env = self.cfg.api_key_env or " or ".join(self.cfg.key_envs()) or "the API key"
            return AuthError(
                f"endpoint {self.name!r} ({self.provider.url}) refused the credentials "
                f"(HTTP {status}: {error_message(raw, self.secrets)}); check {env}"
            )
        if verdict is Verdict.RETRY:
            return Transient(f"HTTP {status}: {error_message(raw, self.secrets)}", status)
        return self.failure(status, raw)

    def dropped(self, call: Call, request: ChatRequest, body: bytes, raw: bytes) -> bool:
        """Whether a 400 named a parameter the model does not take and the request, without it,
        is worth sending again. The first such 400 of a parameter drops it for the endpoint and
        says so once (stderr, and ``dropped`` on this call's trace line); calls already in flight
        with it then find it dropped and just send again."""
        param = self.provider.refused(raw)
        if param is None:
            return False
        if self.provider.drop(param):
            call.dropped = (*call.dropped, param)
            said = one_line(error_message(raw, self.secrets), 160)
            print(
                f"fair: endpoint {self.name!r} ({self.cfg.model}) does not take `{param}` "
                f"(HTTP 400: {said}); sending without it from now on",
                file=sys.stderr,
                flush=True,
            )
            return True
        return self.provider.encode(request) != body

    def __repr__(self) -> str:
        return f"Lane({self.name!r}, {self.provider!r})"


def estimate_tokens(request: ChatRequest) -> float:
    """Tokens the server will count at admission: OpenAI's rule of thumb (chars/4, +3 per message,
    +3 for the reply) plus the completion allowance; a high guess only costs pace."""
    return (
        sum(len(m.content) for m in request.messages) / 4
        + 3 * len(request.messages)
        + 3
        + (request.max_tokens if request.max_tokens is not None else EST_MAX_TOKENS) * max(1, request.n)
    )


AFFINITY_PREFIX_CHARS = 2048  # of the prompt: what a provider's prompt cache would match first


def affinity_of(given: str, request: ChatRequest) -> int:
    """A call's affinity in a key pool as a nonzero int: ``given`` (a problem id) or, without
    one, the prompt's first ``AFFINITY_PREFIX_CHARS`` characters."""
    if not given:
        head = "\x00".join(m.content for m in request.messages)[:AFFINITY_PREFIX_CHARS]
        given = "prefix\x00" + head
    digest = hashlib.blake2b(given.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") | 1


def from_cache(events: Events, call: Call, hit: Completion) -> Completion:
    """A cached answer, marked as one (free, no latency, no attempt) and told to the observers."""
    hit.cached, hit.cost_usd, hit.latency_s, hit.attempts = True, 0.0, 0.0, 0
    call.status = 200
    for hook in events.cached:
        hook(call, hit)
    return hit


def settle(events: Events, lane: Lane, call: Call, done: Completion) -> Completion:
    """The end of a successful call: its latency, attempts and price, told to the observers."""
    done.latency_s = call.elapsed_s
    done.attempts = call.attempts
    done.cost_usd = lane.cost(done.usage)  # cached and cache-write tokens at their own prices
    for hook in events.completed:
        hook(call, done)
    return done


def merged(parts: list[Completion]) -> Completion:
    """The parts of a fan-out (n separate calls for a wire without ``n``) as one completion."""
    return Completion(
        choices=[c for p in parts for c in p.choices],
        usage=sum((p.usage for p in parts), Usage()),
        model=parts[0].model,
        latency_s=max(p.latency_s for p in parts),
        attempts=sum(p.attempts for p in parts),
        cost_usd=sum(p.cost_usd for p in parts),
    )
