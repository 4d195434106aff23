"""Single-flight: identical concurrent calls share one send.

The first caller of a cache key *leads* (``lead``); a caller arriving while it is in flight
*follows* (``follow``): it waits for the leader and gets a copy of its answer. A leader that
fails lets its followers look again (and send themselves, as before single-flight), unless the
run was aborted; a cancelled leader makes them look again too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from fairdistill.engine.types import Completion


class SingleFlight:
    """The calls in flight, by cache key."""

    __slots__ = ("_leaders",)

    def __init__(self) -> None:
        self._leaders: dict[bytes, asyncio.Future[Completion]] = {}

    async def follow(
        self,
        key: bytes,
        lookup: Callable[[bytes], Completion | None],
        aborted: Callable[[], BaseException | None],
    ) -> Completion | None:
        """The answer ``lookup`` (the cache) has, or that of the same request in flight; None
        when this caller must send it (then it ``lead``s)."""
        while (hit := lookup(key)) is None and (leader := self._leaders.get(key)) is not None:
            try:
                return msgspec.structs.replace(await asyncio.shield(leader))
            except asyncio.CancelledError:
                if not leader.cancelled():
                    raise  # this caller was cancelled; if the leader was, look again
            except Exception:
                if (error := aborted()) is not None:
                    raise error from None
                # it failed: look again (and send it ourselves)
        return hit

    def busy(self, key: bytes) -> bool:
        """Whether a call of ``key`` is in flight (if not, ``follow`` is just the look-up: callers
        skip its coroutine, the common case)."""
        return key in self._leaders

    def lead(self, key: bytes) -> None:
        self._leaders[key] = asyncio.get_running_loop().create_future()

    def end(self, key: bytes, outcome: Completion | BaseException) -> None:
        """The leader's outcome, handed to its followers."""
        leader = self._leaders.pop(key)
        if isinstance(outcome, Completion):
            leader.set_result(outcome)
        elif isinstance(outcome, Exception):
            leader.set_exception(outcome)
            leader.exception()  # retrieved: followers try on their own
        else:
            leader.cancel()
