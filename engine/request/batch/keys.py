"""The admission of a batch lane (``Unmetered``) and, for a key pool, its choice of key.

A Batch API meters batches apart from online calls, so a batch lane admits every request at once
(``Unmetered``: no rpm/tpm, no concurrency cap, which would cap a batch's size). With a pool
(``keys = [...]``) it still picks the key each request goes out with: the key of its *affinity*
(a problem id, or the prompt prefix: one organisation's prompt cache sees it again), else the
keys in turn; a key the Batch API refused (``BatchExecutor`` retires it) is skipped. The lease
is that key's index in ``Lane.targets``, so the engine sends with ``lane.targets[key_of(lease)]``.
A reply from a pool key's batch names that key's variable in ``executor.KEY_HEADER`` (a request
sent with a key the Batch API had refused went out with another).
"""

from __future__ import annotations

import itertools
from typing import Any

from fairdistill.engine.errors import AbortRun


class KeptAtProvider(AbortRun):
    """A request whose batch waits at the provider under a key the Batch API now refuses: it is
    never sent again (nothing paid twice) and gets no record; the run stops (exit 1) once the
    rest is done, and a rerun, once the key works, collects that batch."""

    exit_code = 1


class Unmetered:
    """A batch lane's admission: admits at once, counts nothing; picks the key of a pool."""

    def __init__(self, keys: int = 1, affinity: bool = True):
        self.keys = max(1, keys)
        self.affinity = affinity  # False (``key_affinity = false``): the keys in turn, always
        self.retired: set[int] = set()  # key indexes refused for this run
        self._turn = itertools.count()

    def __repr__(self) -> str:
        return f"Unmetered(keys={self.keys}, retired={sorted(self.retired)})"

    def pick(self, affinity: int = 0) -> int:
        """The key for a request: by its affinity when it has one, else in turn; live keys only."""
        live = [i for i in range(self.keys) if i not in self.retired] or [0]
        return live[((affinity if self.affinity else 0) or next(self._turn)) % len(live)]

    async def acquire(self, est_tokens: float = 0.0, affinity: int = 0) -> int:
        return self.pick(affinity)

    def release(self, lease: Any, status: int, headers=None, used_tokens: float | None = None) -> None:
        return None

    def effective_rpm(self) -> float | None:
        return None

    def key_of(self, lease: Any) -> int:
        return lease if isinstance(lease, int) and 0 <= lease < self.keys else 0

    def retire(self, lease: Any) -> tuple[bool, int]:
        """The key of ``lease`` was refused: (whether this retired it, keys left)."""
        key = self.key_of(lease)
        newly = key not in self.retired
        self.retired.add(key)
        return newly, self.keys - len(self.retired)
