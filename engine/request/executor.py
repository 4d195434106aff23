"""Executors: how an encoded request body reaches an endpoint and its reply comes back.

The engine decides *what* to send and *when* (cache, admission, retries); an executor only
*sends*, to a ``Target`` (a small frozen value: url, headers, deadline; never the engine's lane
with its config, admission and key)::

    await executor.open(targets)                       # once, before the first call
    status, body, headers = await executor.send(target, body, key)
    await executor.close()

``key`` names the request (the cache key in hex, ``-i`` added for part i of a fan-out): the
same key is the same request, so an executor may answer both from one send (a Batch API derives
its ``custom_id`` from it). ``send`` returns the HTTP status, the raw reply body and the reply
headers, or raises ``SendError`` when no reply came (``timeout=True`` for a deadline); a reply
header ``BATCH_HEADER`` names the provider batch that answered (traced). ``HttpExecutor`` (the
default) posts over one aiohttp session per endpoint; a provider Batch API or a test's
in-memory server plugs in here without touching the engine or the stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import aiohttp

if TYPE_CHECKING:
    from fairdistill.engine.config import BatchConfig

Reply = tuple[int, bytes, Mapping[str, str]]
BATCH_HEADER = "x-fair-batch"  # reply header an executor sets to the provider batch that answered
KEY_HEADER = "x-fair-batch-key"  # ...and to the variable of the pool key whose batch answered


@dataclass(frozen=True, slots=True)
class BatchTarget:
    """What a Batch API executor needs beyond the online target: the endpoint's identity (its
    ``custom_id`` without a key, the journal) and its ``[endpoints.X.batch]`` settings."""

    provider: str
    base_url: str
    model: str
    key_env: str | None
    settings: BatchConfig


@dataclass(frozen=True, slots=True)
class Target:
    """Where one endpoint's requests go. ``headers`` carry the credentials and ``secret`` is the
    key to mask out of messages: neither is ever shown (``repr``)."""

    endpoint: str
    url: str
    headers: Mapping[str, str] = field(repr=False)
    timeout_s: float
    concurrency: int
    secret: str | None = field(default=None, repr=False)
    batch: BatchTarget | None = None  # set for a ``mode = "batch"`` endpoint
    key_env: str | None = None  # the variable of the key it carries (a name, shown freely)
    pooled: bool = False  # one key of a pool: the endpoint has one target per key

    @property
    def slot(self) -> str:
        """What an executor keys its per-target state by: the endpoint, or ``ENDPOINT#VAR`` for
        one key of a pool (each key has its own session, headers and, on a Batch API, batches)."""
        return f"{self.endpoint}#{self.key_env}" if self.pooled else self.endpoint


class SendError(Exception):
    """No reply: the connection failed or the deadline passed. Never carries a key."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class Executor(Protocol):
    async def open(self, targets: Mapping[str, Target]) -> None: ...
    async def send(self, target: Target, body: bytes, key: str | None = None) -> Reply: ...
    async def close(self) -> None: ...


class HttpExecutor:
    """POST over one aiohttp session per target (an endpoint, or one key of a pool), its auth
    headers set once on the session.

    Every attempt has a wall-clock deadline (``Target.timeout_s``, an aiohttp ``ClientTimeout``
    on the session, so it costs nothing per request)."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def __repr__(self) -> str:
        return f"HttpExecutor(endpoints={list(self._sessions)})"

    async def open(self, targets: Mapping[str, Target]) -> None:
        for target in targets.values():
            connector = aiohttp.TCPConnector(
                limit=target.concurrency + 8, limit_per_host=0, ttl_dns_cache=300
            )
            self._sessions[target.slot] = aiohttp.ClientSession(
                connector=connector,
                headers=dict(target.headers),
                timeout=aiohttp.ClientTimeout(total=target.timeout_s),
                raise_for_status=False,
            )

    async def send(self, target: Target, body: bytes, key: str | None = None) -> Reply:
        session = self._sessions.get(target.slot)
        if session is None:
            raise RuntimeError("Engine is not open: use `async with Engine(...) as engine`")
        try:
            async with session.post(target.url, data=body) as resp:
                return resp.status, await resp.read(), resp.headers
        except TimeoutError:
            raise SendError(f"no reply within {target.timeout_s:g}s", timeout=True) from None
        except aiohttp.ClientError as exc:
            detail = str(exc)
            raise SendError(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__) from None

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()
