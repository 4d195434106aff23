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

from engine.config import EndpointConfig
from engine.request.cache import KeyPrefixes, ResponseCache, cache_key
from engine.request.client import Engine
from engine.types import ChatRequest, Choice, Completion, Message, Usage, user


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


def test_key_prefixes_know_every_added_key_through_growth():
    keys = [hashlib.sha256(b"k%d" % i).digest() for i in range(5000)]
    known = KeyPrefixes(keys[:100])
    for k in keys[100:]:
        known.add(k)
    known.add(keys[0])  # again: no duplicate slot
    assert all(k in known for k in keys)
    others = [hashlib.sha256(b"x%d" % i).digest() for i in range(5000)]
    assert sum(k in known for k in others) == 0  # 64-bit prefixes: a false hit is ~1e-12
    assert bytes(8) + b"rest" not in known and b"\x00" * 32 not in KeyPrefixes()


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
    """Puts in a tight loop (faster than SQLite commits): the write buffer never holds more than
    MAX_BUFFERED entries plus the batch being written (it held every entry, ~450 B each, when the
    writer fell behind), and every entry is stored in the end."""
    from engine.request import cache as cache_mod

    cache = ResponseCache(tmp_path / "c.sqlite")
    most = 0
    n = 6 * cache_mod.MAX_BUFFERED
    for i in range(n):
        cache.put(hashlib.sha256(b"%d" % i).digest(), done(f"a{i}"))
        most = max(most, len(cache._pending) + len(cache._writing))
    assert most <= cache_mod.MAX_BUFFERED + cache_mod.FLUSH_EVERY
    await cache.flush()
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")
    assert len(again) == n and again.get(hashlib.sha256(b"7").digest()).choices[0].text == "a7"
    again.close()


def test_sigkill_keeps_committed_entries_and_never_a_half_one(tmp_path):
    """A writer killed mid-stream: what it committed is there, the file is intact."""
    path = tmp_path / "c.sqlite"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from engine.request.cache import ResponseCache
        from engine.types import Choice, Completion, Usage
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
