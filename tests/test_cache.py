"""Response cache: canonical keys, persistence, crash safety, and free hits through the engine."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from fakeserver import FakeServer

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.request.cache import ResponseCache, cache_key
from fairdistill.engine.request.client import Engine
from fairdistill.engine.rundir.idset import HashSet64, key_hash
from fairdistill.engine.types import ChatRequest, Choice, Completion, Message, Usage, user


def done(text: str) -> Completion:
    return Completion(choices=[Choice(text, "stop")], usage=Usage(3, 2), model="m")


def test_key_is_canonical_and_covers_what_determines_the_answer():
    req = ChatRequest(messages=user("q", system="s"), max_tokens=5, temperature=0.7)
    key = cache_key("openai", "http://h/v1", "m", req)
    assert key == cache_key("openai", "http://h/v1/", "m", req)  # trailing slash is not a difference
    assert len(key) == 32
    variants = [
        ("anthropic", "http://h/v1", "m", req),
        ("openai", "http://other/v1", "m", req),
        ("openai", "http://h/v1", "m2", req),
        (
            "openai",
            "http://h/v1",
            "m",
            ChatRequest(messages=user("q2", system="s"), max_tokens=5, temperature=0.7),
        ),
        (
            "openai",
            "http://h/v1",
            "m",
            ChatRequest(messages=user("q", system="s"), max_tokens=6, temperature=0.7),
        ),
        (
            "openai",
            "http://h/v1",
            "m",
            ChatRequest(messages=user("q", system="s"), max_tokens=5, temperature=0.0),
        ),
        (
            "openai",
            "http://h/v1",
            "m",
            ChatRequest(messages=user("q", system="s"), max_tokens=5, temperature=0.7, sample_index=1),
        ),
        (
            "openai",
            "http://h/v1",
            "m",
            ChatRequest(messages=(Message("user", "q"),), max_tokens=5, temperature=0.7),
        ),
    ]
    keys = {cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_key_hashes_know_every_added_key_through_growth_in_under_16_bytes_a_key():
    keys = [hashlib.sha256(b"k%d" % i).digest() for i in range(5000)]
    known = HashSet64.build((key_hash(k) for k in keys[:100]), 100)
    for k in keys[100:]:
        known.add(key_hash(k))
    assert not known.add(key_hash(keys[0]))  # again: no duplicate
    assert len(known) == 5000 and all(key_hash(k) in known for k in keys)
    others = [hashlib.sha256(b"x%d" % i).digest() for i in range(5000)]
    assert sum(key_hash(k) in known for k in others) == 0  # 64-bit hashes: a false hit is ~1e-12
    assert HashSet64.from_sorted(known.to_bytes()).to_bytes() == known.to_bytes()
    assert known.nbytes() <= 16 * len(known)


async def test_entries_persist_and_are_visible_before_commit(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    k1, k2 = b"1" * 32, b"2" * 32
    assert cache.get(k1) is None
    cache.put(k1, done("one"))
    assert cache.get(k1).text == "one"  # buffered, not yet committed, already readable
    cache.put(k2, done("two"))
    await cache.flush()
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")
    assert again.get(k1).text == "one" and again.get(k2).text == "two"
    assert again.get(b"3" * 32) is None
    assert len(again) == 2
    again.close()


async def test_buffered_writes_stay_bounded_when_puts_outrun_the_writer(tmp_path):
    """Puts in a tight loop (faster than SQLite commits): the entries handed to the writer and not
    yet committed never exceed MAX_BUFFERED (they held every entry, ~450 B each, when the writer
    fell behind), and every entry is stored in the end."""
    from fairdistill.engine.request import cache as cache_mod

    cache = ResponseCache(tmp_path / "c.sqlite")
    most = 0
    n = 6 * cache_mod.MAX_BUFFERED
    for i in range(n):
        cache.put(hashlib.sha256(b"%d" % i).digest(), done(f"a{i}"))
        most = max(most, len(cache._pending))
    assert most <= cache_mod.MAX_BUFFERED
    await cache.flush()
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")
    assert len(again) == n and again.get(hashlib.sha256(b"7").digest()).choices[0].text == "a7"
    again.close()


async def test_an_answer_is_committed_within_50_ms_without_a_flush(tmp_path):
    """The writer thread commits each answer as it arrives: another connection sees it within
    ~50 ms with nothing flushed or closed (it waited up to 0.5 s or 256 entries before)."""
    path = tmp_path / "c.sqlite"
    cache = ResponseCache(path)
    other = sqlite3.connect(path)
    lags = []
    for i in range(20):
        key = hashlib.sha256(b"d%d" % i).digest()
        t0 = time.monotonic()
        cache.put(key, done(f"d{i}"))
        while other.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is None:
            assert time.monotonic() - t0 < 2.0, "never committed"
            time.sleep(0.001)
        lags.append(time.monotonic() - t0)
    other.close()
    assert sorted(lags)[len(lags) // 2] < 0.05 and cache.commit_lag_s < 0.5
    cache.close()


async def test_one_commit_of_many_rows_keeps_every_entry_and_the_last_value_of_a_key(tmp_path):
    """The writer inserts a batch many rows per statement (chunks of powers of two): an odd count
    of entries put in one burst are all stored, and a key put twice keeps its second value."""
    cache = ResponseCache(tmp_path / "c.sqlite")
    keys = [hashlib.sha256(b"m%d" % i).digest() for i in range(1000 + 37)]
    for i, key in enumerate(keys):
        cache.put(key, done(f"first{i}"))
    cache.put(keys[5], done("second5"))  # most likely in the same batch as its first value
    await cache.flush()
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")
    assert len(again) == len(keys)
    assert [again.get(k).choices[0].text for k in keys[4:7]] == ["first4", "second5", "first6"]
    assert again.get(keys[-1]).choices[0].text == f"first{len(keys) - 1}"
    again.close()


def test_sigkill_keeps_committed_entries_and_never_a_half_one(tmp_path):
    """A writer killed mid-stream: what it committed is there, the file is intact."""
    path = tmp_path / "c.sqlite"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from fairdistill.engine.request.cache import ResponseCache
        from fairdistill.engine.types import Choice, Completion, Usage
        async def main():
            cache = ResponseCache({str(path)!r})
            c = Completion(choices=[Choice("x" * 2000, "stop")], usage=Usage(1, 1))
            for i in range(500):
                cache.put(i.to_bytes(32, "big"), c)
            await cache.flush()
            print("committed", flush=True)
            i = 500
            while True:  # keep writing until killed
                cache.put(i.to_bytes(32, "big"), c)
                i += 1
                if i % 256 == 0:
                    await asyncio.sleep(0)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "committed"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    cache = ResponseCache(path)
    assert all(cache.get(i.to_bytes(32, "big")) is not None for i in range(500))
    n = len(cache)
    for i in range(500, n + 10):
        hit = cache.get(i.to_bytes(32, "big"))
        assert hit is None or hit.text == "x" * 2000  # present and whole, or absent
    cache.close()


async def test_a_cache_hit_costs_nothing_and_sends_nothing(tmp_path):
    async with FakeServer() as srv:
        cfg = EndpointConfig(base_url=srv.url, model="m", price_in=1.0, price_out=2.0)
        req = ChatRequest(messages=user("same question"))
        async with Engine({"a": cfg}, cache_path=tmp_path / "cache.sqlite") as engine:
            first = await engine.complete("a", req)
            second = await engine.complete("a", req)
            other = await engine.complete("a", ChatRequest(messages=user("same question"), sample_index=1))
        assert len(srv.seen) == 2  # the repeat never reached the server; sample 1 did
        assert not first.cached and first.cost_usd > 0
        assert second.cached and second.cost_usd == 0.0 and second.text == first.text
        assert not other.cached
        assert engine.stats["a"].cache_hits == 1 and engine.stats["a"].requests == 3
        # a new engine on the same file (a resumed run) pays nothing either
        async with Engine({"a": cfg}, cache_path=tmp_path / "cache.sqlite") as engine:
            third = await engine.complete("a", req)
        assert third.cached and len(srv.seen) == 2
