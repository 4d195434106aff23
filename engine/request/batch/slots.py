"""Compact storage for the requests waiting in a lane's batches (``BatchExecutor``).

A 50k-line ``fair generate --mode batch`` keeps 50k requests waiting at once; an object or two per
request (a future, a small class, a custom id string, a dict entry) cost ~600 bytes each. Here a
waiting request is a *slot*: a number indexing parallel arrays (its packed custom id, spool
offset and size, rounds, batch, caller token) and an open-addressing table from packed custom id
to slot: ~70 bytes a request, plus 24 in its batch's ids, one bytes blob (``CidList``).

A custom id is ``fd`` + 40 hex digits (+ ``-N`` for part N of a fan-out) (``executor.custom_id``);
packed: 20 bytes of digest + 4 bytes of part (0: none, else N + 1).
"""

from __future__ import annotations

import asyncio
import re
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, overload

KEY = 24  # bytes of a packed custom id
_CID = re.compile(r"fd([0-9a-f]{40})(?:-([0-9]{1,9}))?")
OPEN = -1  # ``Slots.batch`` of a slot in the open batch (not yet submitted)


def pack(cid: str) -> bytes | None:
    """The 24-byte form of a custom id; None for a string no ``custom_id`` makes (not ours)."""
    m = _CID.fullmatch(cid)
    if m is None:
        return None
    part = 0 if m[2] is None else int(m[2]) + 1
    return bytes.fromhex(m[1]) + part.to_bytes(4, "big")


def unpack(key: bytes | bytearray | memoryview) -> str:
    part = int.from_bytes(key[20:KEY], "big")
    return "fd" + bytes(key[:20]).hex() + (f"-{part - 1}" if part else "")


class CidList(Sequence[str]):
    """The custom ids of one batch, in upload order, as one blob of packed ids."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes | bytearray):
        self.blob = blob  # not changed once given

    def __len__(self) -> int:
        return len(self.blob) // KEY

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return unpack(self.blob[i * KEY : (i + 1) * KEY])

    def __iter__(self) -> Iterator[str]:
        return map(unpack, self.packed())

    def packed(self) -> Iterator[bytes]:
        view = memoryview(self.blob)
        return (bytes(view[o : o + KEY]) for o in range(0, len(self.blob), KEY))

    def json(self) -> bytearray:
        """The ids as a JSON array, built in one buffer."""
        out = bytearray(b"[")
        for i, key in enumerate(self.packed()):
            out += b',"' if i else b'"'
            out += unpack(key).encode()
            out += b'"'
        out += b"]"
        return out

    def __repr__(self) -> str:
        return f"CidList(n={len(self)})"


class Slots:
    """The waiting requests of one lane. Per slot: ``keys`` (packed custom id), ``pos``/``size``
    (its body in the lane's spool), ``rounds`` (batches it went through), ``batch`` (the serial
    of the batch it is in, or ``OPEN``), and its callers: ``waiter`` (a future, or the
    sink of a streaming caller, with ``token``) plus ``extra`` ones for identical requests."""

    def __init__(self) -> None:
        self.keys = bytearray()
        self.pos = array("q")
        self.size = array("i")
        self.rounds = bytearray()
        self.batch = array("i")
        self.token = array("i")
        self.waiter: list[Any] = []  # None: a free slot (or one in the open batch, to drop)
        self.extra: dict[int, list[tuple[Any, int]]] = {}
        self._free = array("i")
        self._table = array("i", bytes(4 * 1024))  # slot + 1; 0 = empty
        self._mask = 1023
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def key(self, slot: int) -> bytes:
        return bytes(self.keys[slot * KEY : (slot + 1) * KEY])

    # -- the table: packed custom id -> slot (linear probing, at most half full) ---------------

    def _index(self, key: bytes) -> int:
        """The table index holding ``key``'s slot, or the empty one where it would go."""
        table, mask, keys = self._table, self._mask, self.keys
        i = hash(key) & mask
        while (v := table[i]) and keys[(v - 1) * KEY : v * KEY] != key:
            i = (i + 1) & mask
        return i

    def find(self, key: bytes) -> int:
        """The slot waiting for ``key``, or -1."""
        return self._table[self._index(key)] - 1

    def add(self, key: bytes, waiter: Any, token: int, pos: int, size: int) -> int:
        """A new slot for ``key`` (which must not be waiting)."""
        if self._free:
            slot = self._free.pop()
            self.keys[slot * KEY : (slot + 1) * KEY] = key
            self.pos[slot], self.size[slot], self.rounds[slot] = pos, size, 0
            self.batch[slot], self.token[slot], self.waiter[slot] = OPEN, token, waiter
        else:
            slot = len(self.waiter)
            self.keys += key
            self.pos.append(pos)
            self.size.append(size)
            self.rounds.append(0)
            self.batch.append(OPEN)
            self.token.append(token)
            self.waiter.append(waiter)
        self._table[self._index(key)] = slot + 1
        self._n += 1
        if 2 * self._n > len(self._table):
            self._grow()
        return slot

    def _grow(self) -> None:
        old = self._table
        self._table, self._mask = array("i", bytes(8 * len(old))), 2 * len(old) - 1
        for v in old:
            if v:
                self._table[self._index(self.key(v - 1))] = v

    def unlink(self, slot: int) -> None:
        """Take ``slot`` out of the table (its data stays until ``free``): backward-shift deletion."""
        table, mask = self._table, self._mask
        i = self._index(self.key(slot))
        if table[i] != slot + 1:
            return
        table[i] = 0
        self._n -= 1
        j = i
        while v := table[(j := (j + 1) & mask)]:
            home = hash(self.key(v - 1)) & mask
            if (j > i and (home <= i or home > j)) or (j < i and i >= home > j):
                table[i], table[j] = v, 0
                i = j

    def free(self, slot: int) -> None:
        self.waiter[slot] = None
        self.extra.pop(slot, None)
        self._free.append(slot)

    # -- callers ---------------------------------------------------------------------------------

    def callers(self, slot: int) -> list[tuple[Any, int]]:
        return [(self.waiter[slot], self.token[slot]), *self.extra.get(slot, ())]

    def live(self, slot: int) -> bool:
        """Whether a caller still waits (a future not cancelled; a sink always does)."""
        waiter = self.waiter[slot]
        if waiter is not None and not _done(waiter):
            return True
        return any(not _done(w) for w, _ in self.extra.get(slot, ()))

    def join(self, slot: int, waiter: Any, token: int) -> bool:
        """Another caller of the same request; False when it took over a slot no one waited on."""
        if self.live(slot):
            self.extra.setdefault(slot, []).append((waiter, token))
            return True
        self.waiter[slot], self.token[slot] = waiter, token
        self.extra.pop(slot, None)
        return False

    def take(self, slot: int) -> list[tuple[Any, int]]:
        """Unlink ``slot`` and hand back its callers; a slot in the open batch is only emptied
        (the flush frees it), any other is freed."""
        callers = self.callers(slot)
        self.unlink(slot)
        if self.batch[slot] == OPEN:
            self.waiter[slot] = None
            self.extra.pop(slot, None)
        else:
            self.free(slot)
        return callers

    def waiting(self) -> Iterator[int]:
        """The slots in the table."""
        return (v - 1 for v in self._table if v)


def _done(waiter: Any) -> bool:
    return isinstance(waiter, asyncio.Future) and waiter.done()
