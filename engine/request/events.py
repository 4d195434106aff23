"""Request events: what one call did, told to whoever listens (like aiohttp's ``TraceConfig``).

A call (``Call``) is the record of one logical request to one endpoint: its attempts, the 429s
it met, the last HTTP status. As it moves through the request path it emits events, in order::

    requested  complete() began (once per complete(), before the cache)
    cached     answered from the response cache; nothing is sent
    admitted   admission granted a slot (once per HTTP try; 429s try again); with a key pool
               ``call.key_env`` names the key's variable from here on (a 401/403 on it adds it to
               ``call.refused``, and the try goes again on another key)
    sent       the request went out
    throttled  the reply was a 429; the call goes back to admission after ``answered``
    answered   the try is over and its slot released (always, from a ``finally``):
               ``call.status`` (0 = no reply; ``call.timed_out``)
    retried    a failed attempt (5xx, reset, timeout, bad body) is tried again
    completed  the call succeeded: a ``Completion`` with usage, latency and cost
    failed     the call failed for good (``RequestError``, ``ReplyError``, ``AuthError``)

Stats (``engine.request.stats.StatsObserver``), the trace (``engine.request.trace.TraceObserver``), the
progress display (``engine.progress``) and the Prometheus metrics (``engine.request.metrics``) are all
observers: subclasses of ``Observer`` that override the events they care about. ``Events``
keeps, per event, a tuple of the overriding methods only, so an event nobody observes costs an
empty loop on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fairdistill.engine.types import Completion

EVENTS = (
    "requested", "cached", "admitted", "sent", "answered", "throttled", "retried", "completed", "failed",
)  # fmt: skip


class Call:
    """One logical call to one endpoint (its HTTP tries, 429s and retries included)."""

    __slots__ = (
        "affinity", "attempts", "batch", "dropped", "endpoint", "est_tokens", "http_429", "key_env", "model",
        "refused", "stage", "started", "status", "timed_out",
    )  # fmt: skip

    def __init__(
        self, endpoint: str, model: str, est_tokens: float = 0.0, stage: str = "", affinity: int = 0
    ):
        self.endpoint = endpoint
        self.model = model
        self.stage = stage  # what the call is for ("rationale", "review"...), when the caller said
        self.est_tokens = est_tokens  # tokens admission reserves for it
        self.attempts = 0  # attempts made (failed ones count; 429s do not)
        self.http_429 = 0  # rate-limit answers received
        self.status = 0  # HTTP status of the last try; 0 = no reply
        self.timed_out = False  # the last try hit its deadline
        self.batch: str | None = None  # the provider batch that answered it (a Batch API executor)
        self.dropped: tuple[str, ...] = ()  # parameters it made the endpoint drop (a 400 named them)
        self.refused: tuple[str, ...] = ()  # pool keys' variables that answered it 401/403 (retired)
        self.affinity = affinity  # keeps related calls on one key of a pool (0: none)
        self.key_env: str | None = None  # the variable of the pool key its last try went out with
        self.started = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"Call({self.endpoint!r}, attempts={self.attempts}, http_429={self.http_429}, "
            f"status={self.status})"
        )

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


class Observer:
    """Base class of request-event observers: every method is a no-op; override what you need.
    Observers run on the event loop, inline: keep them to a few counter updates."""

    def requested(self, call: Call) -> None: ...
    def cached(self, call: Call, done: Completion) -> None: ...
    def admitted(self, call: Call) -> None: ...
    def sent(self, call: Call) -> None: ...
    def answered(self, call: Call) -> None: ...
    def throttled(self, call: Call) -> None: ...
    def retried(self, call: Call) -> None: ...
    def completed(self, call: Call, done: Completion) -> None: ...
    def failed(self, call: Call, error: BaseException) -> None: ...


class Events:
    """The observers of one engine, as one tuple of bound methods per event (declared below, so
    a reader and mypy see every hook; ``_build`` fills them from the observers' overrides)."""

    __slots__ = ("observers", *EVENTS)

    requested: tuple[Callable[[Call], None], ...]
    cached: tuple[Callable[[Call, Completion], None], ...]
    admitted: tuple[Callable[[Call], None], ...]
    sent: tuple[Callable[[Call], None], ...]
    answered: tuple[Callable[[Call], None], ...]
    throttled: tuple[Callable[[Call], None], ...]
    retried: tuple[Callable[[Call], None], ...]
    completed: tuple[Callable[[Call, Completion], None], ...]
    failed: tuple[Callable[[Call, BaseException], None], ...]

    def __init__(self, observers: tuple[Observer, ...] = ()):
        self.observers: tuple[Observer, ...] = ()
        for obs in observers:
            if not isinstance(obs, Observer):
                raise TypeError(f"{obs!r} is not an engine.request.events.Observer")
        self.observers = tuple(observers)
        self._build()

    def add(self, observer: Observer) -> None:
        if not isinstance(observer, Observer):
            raise TypeError(f"{observer!r} is not an engine.request.events.Observer")
        self.observers = (*self.observers, observer)
        self._build()

    def remove(self, observer: Observer) -> None:
        self.observers = tuple(o for o in self.observers if o is not observer)
        self._build()

    def _build(self) -> None:
        obs = self.observers
        self.requested = _hooks(obs, "requested")
        self.cached = _hooks(obs, "cached")
        self.admitted = _hooks(obs, "admitted")
        self.sent = _hooks(obs, "sent")
        self.answered = _hooks(obs, "answered")
        self.throttled = _hooks(obs, "throttled")
        self.retried = _hooks(obs, "retried")
        self.completed = _hooks(obs, "completed")
        self.failed = _hooks(obs, "failed")


def _hooks(observers: tuple[Observer, ...], name: str) -> tuple[Any, ...]:
    """The bound ``name`` methods of the observers that override it (an event nobody observes
    is an empty tuple: one empty loop on the hot path)."""
    base = getattr(Observer, name)
    return tuple(getattr(o, name) for o in observers if getattr(type(o), name) is not base)
