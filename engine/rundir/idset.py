"""A compact set of 64-bit hashes: what resume and the response cache keep per id or key.

``HashSet64`` holds the hashes in sorted ``array("Q")`` buckets selected by their top bits, about
``BUCKET`` hashes a bucket: ~9 bytes a member (8 for the hash, the rest array headers and
over-allocation), where a Python ``set`` of the id strings costs 100-300 bytes. A lookup or an
insert is one C-level ``bisect`` on a small array. The whole set is written to disk and read back
as one sorted run of little-endian ``uint64`` (``to_bytes`` / ``from_sorted``), so a resume loads
it instead of re-reading every shard.

``id_hash`` is 64 bits of BLAKE2b: two different ids share a hash with probability ~n²/2^65 per
run (3e-4 at 100M ids). Callers that can look a hit up on disk (the cache: a primary-key query)
confirm it there; the record store accepts that risk (see ``engine.rundir.store``).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import BinaryIO

BUCKET = 512  # hashes per bucket on average before the bucket count doubles
_LITTLE = sys.byteorder == "little"
_blake2b, _from_bytes = hashlib.blake2b, int.from_bytes  # bound once: called per record


def id_hash(record_id: str) -> int:
    """64 bits of BLAKE2b of the id's UTF-8 (stable across processes, unlike ``hash``)."""
    return _from_bytes(_blake2b(record_id.encode(), digest_size=8).digest(), "little")


def key_hash(key: bytes) -> int:
    """A cache key (already a sha256 digest) as 64 bits: its first 8 bytes."""
    return int.from_bytes(key[:8], "little")


class HashSet64:
    """A set of ints in [0, 2**64), in ~9 bytes a member."""

    __slots__ = ("_bits", "_buckets", "_n")

    def __init__(self, bits: int = 0):
        self._bits = bits
        self._buckets = [array("Q") for _ in range(1 << bits)]
        self._n = 0

    def _bucket(self, h: int) -> array:
        return self._buckets[h >> (64 - self._bits)]

    def __contains__(self, h: object) -> bool:
        b = self._buckets[h >> (64 - self._bits)]  # type: ignore[operator]  # inlined: the hot path
        i = bisect_left(b, h)  # type: ignore[call-overload]
        return i < len(b) and b[i] == h

    def add(self, h: int) -> bool:
        """Insert ``h``; returns whether it was new."""
        b = self._buckets[h >> (64 - self._bits)]  # ``_bucket`` inlined: the hot path
        i = bisect_left(b, h)
        if i < len(b) and b[i] == h:
            return False
        b.insert(i, h)
        self._n += 1
        if self._n > BUCKET << self._bits:
            self._split()
        return True

    def discard(self, h: int) -> None:
        b = self._bucket(h)
        i = bisect_left(b, h)
        if i < len(b) and b[i] == h:
            del b[i]
            self._n -= 1

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        for b in self._buckets:
            yield from b

    def _split(self) -> None:
        """Double the buckets: each sorted bucket splits at its next bit."""
        self._bits += 1
        shift = 64 - self._bits
        old, self._buckets = self._buckets, []
        for j, b in enumerate(old):
            k = bisect_left(b, (2 * j + 1) << shift)
            self._buckets += (b[:k], b[k:])
            old[j] = array("Q")  # free as we go: the split never holds two copies of the set

    def _merge(self) -> None:
        """Halve the buckets: neighbours share all but their last top bit, so they concatenate."""
        old, self._buckets = self._buckets, []
        for j in range(0, len(old), 2):
            self._buckets.append(old[j] + old[j + 1])
            old[j] = old[j + 1] = array("Q")  # free as we go, as ``_split`` does
        self._bits -= 1

    def nbytes(self) -> int:
        """Memory held, headers included (what the ≤ 16 bytes-a-member budget counts)."""
        return sys.getsizeof(self._buckets) + sum(sys.getsizeof(b) for b in self._buckets)

    # -- bulk ------------------------------------------------------------------------------
    @classmethod
    def build(cls, hashes: Iterable[int], expected: int = 0) -> HashSet64:
        """From hashes in any order (duplicates allowed), appended then sorted per bucket:
        C-speed sorting instead of one ``bisect.insort`` a member. ``expected`` sizes the buckets."""
        s = cls(_bits_for(expected))
        buckets, shift = s._buckets, 64 - s._bits
        for h in hashes:
            buckets[h >> shift].append(h)
        for j, b in enumerate(buckets):
            buckets[j] = array("Q", sorted(set(b)))
        s._n = sum(len(b) for b in buckets)
        while s._n > BUCKET << s._bits:
            s._split()
        while s._bits and s._n < (BUCKET << s._bits) // 4:  # ``expected`` was far too high
            s._merge()
        return s

    @classmethod
    def from_sorted(cls, data: bytes | memoryview) -> HashSet64:
        """From ``to_bytes`` output: sorted, distinct little-endian uint64."""
        flat = array("Q")
        flat.frombytes(data)
        if not _LITTLE:
            flat.byteswap()
        s = cls(_bits_for(len(flat)))
        shift = 64 - s._bits
        bounds = [bisect_left(flat, j << shift) for j in range(1 << s._bits)] + [len(flat)]
        s._buckets = [flat[bounds[j] : bounds[j + 1]] for j in range(1 << s._bits)]
        s._n = len(flat)
        return s

    @classmethod
    def from_file(cls, f: BinaryIO, n: int, chunk: int = 1 << 16) -> HashSet64:
        """``n`` hashes as ``to_bytes`` wrote them, read from ``f`` a chunk at a time straight into
        their buckets: the peak is the set plus one chunk, not twice the set (80 MB at 10M ids).
        ``EOFError`` if ``f`` ends early."""
        s = cls(_bits_for(n))
        shift, buckets, left = 64 - s._bits, s._buckets, n
        while left:
            part = array("Q")
            part.fromfile(f, min(chunk, left))
            if not _LITTLE:
                part.byteswap()
            left -= len(part)
            i = 0
            while i < len(part):
                j = part[i] >> shift
                end = bisect_left(part, (j + 1) << shift, i)
                buckets[j].extend(part[i:end])
                i = end
        s._n = n
        return s

    def to_bytes(self) -> bytes:
        """Every member, sorted, as little-endian uint64."""
        flat = array("Q")
        for b in self._buckets:
            flat.extend(b)
        if not _LITTLE:
            flat.byteswap()
        return flat.tobytes()


def _bits_for(n: int) -> int:
    return max(0, (n // BUCKET).bit_length())
