"""``fair bench throughput``: the engine vs a bare aiohttp loop vs the openai SDK, on the simulator.

Three regimes, each against a simulator running in its own process (``fair sim``), each client
arm in a fresh child process (clean CPU and peak-RSS accounting, no shared event loop):

- **overhead-bound**: 0 ms server latency, many requests at concurrency 256. The client's own
  cost per request is all that limits throughput. Target: engine >= 50 % of bare req/s.
- **latency-bound**: 500 ms fixed latency at concurrency 512; the ceiling is concurrency/latency.
  Target: engine >= 95 % of bare req/s.
- **limit-bound**: a hidden 6,000 RPM the engine is *not* told (no ``rpm`` configured); it must
  find it from 429s and ``x-ratelimit-*`` headers. Run >= 60 s; the sustained rate after the
  first 30 s and the share of 429s are read from the simulator's counters. Target: >= 95 % of
  the limit with < 2 % 429s. Engine only (a client that ignores limits just collects 429s).

The engine arm is ``engine.generate.generate`` in-process: the real ``fair generate`` path with
its run store, trace and response cache (``--no-cache`` turns the cache off). The bare arm is the
smallest aiohttp loop that sends, reads and parses each reply. The SDK arm is ``AsyncOpenAI``
with ``max_retries=0`` and a connection pool as large as the concurrency.

Figures per arm: req/s, client CPU microseconds per request (``time.process_time`` of the child),
client-observed latency p50/p99 minus the server-side latency (the simulator's ``x-sim-latency-ms``,
whose quantiles it reports at ``/stats?latency=1``) = "added" latency, and peak RSS of the child.
The latency is fixed in every regime, so the difference of quantiles is the per-request overhead.
For the engine, client latency is the per-call ``latency_s`` of its trace.

``--memory``: instead, RSS of ``generate`` over 200k records (RSS at 20k vs at 200k records,
sampled by the parent from /proc). The run store keeps an index of written ids; growth beyond
that index (measured separately for the same ids) over 200 B per record fails the check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from array import array
from pathlib import Path
from typing import Any

import orjson

ARMS = ("bare", "engine", "sdk")
RPM_LIMIT = 6000
SIM_PROFILE = f"""
name = "bench-throughput"
[models.fast]
content = "echo"
[models.slow]
content = "echo"
latency_ms = 500
[models.limited]
content = "echo"
latency_ms = 100
rpm = {RPM_LIMIT}
limit_burst_s = 10
"""
MAX_TOKENS = 16
TARGETS = {
    "overhead": 0.50,
    "latency": 0.95,
    "limit": 0.95,
    "limit_429_share": 0.02,
    "shape_vs_ideal": 1.25,
    "cpu_per_req_vs_bare": 1.2,
    "shape_429_share": 0.03,
}

# hidden limits of the shapes providers and gateways use, sent WITHOUT any rate-limit header
# (only 429 + Retry-After: 1): what a new user meets. 3,000 rpm, 200 ms, concurrency 64.
SHAPE_RPM = 3000
SHAPE_LATENCY_MS = 200
SHAPES = ("bucket_1s", "bucket_60s", "fixed_window", "sliding_window")


def shape_profile(window_s: float) -> str:
    """Models ``bucket_1s``, ``bucket_60s`` (its depth is the window), ``fixed_window`` and
    ``sliding_window`` of ``window_s`` seconds, all hiding their limits."""
    out = []
    for name in SHAPES:
        shape = "bucket" if name.startswith("bucket") else name
        burst = 1.0 if name == "bucket_1s" else window_s
        out.append(
            f'[models.{name}]\ncontent = "echo"\nlatency_ms = {SHAPE_LATENCY_MS}\nrpm = {SHAPE_RPM}\n'
            f'limit_shape = "{shape}"\nlimit_burst_s = {burst}\nlimit_window_s = {window_s}\n'
            "limit_headers = false\n"
        )
    return "\n".join(out)


def ideal_s(shape: str, n: int, window_s: float, concurrency: int) -> float:
    """The least time ``n`` calls can take against the shape: as fast as the concurrency allows
    while the limit has room, then at its pace (a bucket's refill, or the next window)."""
    rate, latency = SHAPE_RPM / 60, SHAPE_LATENCY_MS / 1000
    fast = concurrency / latency  # calls/s the concurrency allows
    if shape.startswith("bucket"):
        depth = rate * (1.0 if shape == "bucket_1s" else window_s)
        empty_at = depth / (fast - rate)  # the burst drains the bucket while it refills
        if n <= fast * empty_at:
            return n / fast + latency
        return empty_at + (n - fast * empty_at) / rate + latency
    budget = rate * window_s  # a window's worth: a burst, then wait for the next window
    # (sliding: the calls of the first burst leave the window at the pace they entered it)
    full = math.ceil(n / budget) - 1
    return full * window_s + (n - full * budget) / fast + latency


def regimes(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {
            "overhead": {"model": "fast", "requests": 5000, "concurrency": 256, "sdk_requests": 1000},
            "latency": {"model": "slow", "requests": 3000, "concurrency": 512, "sdk_requests": 1000},
            "limit": {"model": "limited", "duration_s": 24, "measure_after_s": 10, "concurrency": 256},
            "shapes": {"requests": 1500, "window_s": 15.0, "concurrency": 64},
        }
    return {
        "overhead": {"model": "fast", "requests": 20000, "concurrency": 256, "sdk_requests": 5000},
        "latency": {"model": "slow", "requests": 10000, "concurrency": 512, "sdk_requests": 10000},
        "limit": {"model": "limited", "duration_s": 65, "measure_after_s": 30, "concurrency": 256},
        "shapes": {"requests": 6000, "window_s": 60.0, "concurrency": 64},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--regimes",
        default="overhead,latency,limit",
        help="comma list of regimes to run: overhead, latency, limit, shapes (hidden limits of "
        "every shape, no rate-limit headers)",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help="shapes regime: which limit shapes")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list: bare,engine,sdk")
    parser.add_argument("--no-cache", action="store_true", help="engine arm without its response cache")
    parser.add_argument(
        "--loop",
        default="asyncio",
        help="event loop of the client arms: asyncio, uvloop, or both (asyncio,uvloop: each arm twice)",
    )
    parser.add_argument("--memory", action="store_true", help="RSS flatness of generate over many records")
    parser.add_argument("--records", type=int, default=200_000, help="--memory: records to generate")


# -- the child: one arm, one regime -------------------------------------------------------------


def _message(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {i}: reply with a short greeting."}]


def _quantiles(values: list[float] | array) -> dict[str, float]:
    data = sorted(values)
    if not data:
        return {}
    return {
        "p50": data[len(data) // 2] * 1000,
        "p99": data[min(len(data) - 1, int(0.99 * len(data)))] * 1000,
    }


def _http(url: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


async def _bare(base_url: str, model: str, start: int, n: int, concurrency: int) -> dict[str, Any]:
    import aiohttp

    url = f"{base_url}/chat/completions"
    headers = {"Content-Type": "application/json"}
    latencies = array("d")
    counts = {"ok": 0, "errors": 0}
    ids = iter(range(start, start + n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in ids:
                body = orjson.dumps({"model": model, "messages": _message(i), "max_tokens": MAX_TOKENS})
                t = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        raw = await r.read()
                        status = r.status
                except aiohttp.ClientError:
                    counts["errors"] += 1
                    continue
                if status == 200:
                    orjson.loads(raw)["choices"][0]["message"]["content"]  # parse like a client
                    latencies.append(time.perf_counter() - t)
                    counts["ok"] += 1
                else:
                    counts["errors"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {**counts, "latencies": latencies}


async def _sdk(base_url: str, model: str, start: int, n: int, concurrency: int) -> dict[str, Any]:
    import openai

    try:
        import httpx
    except ImportError:  # some openai builds ship their HTTP client as httpx2
        import httpx2 as httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="sim",
        max_retries=0,
        timeout=120.0,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits),
    )
    latencies = array("d")
    counts = {"ok": 0, "errors": 0}
    ids = iter(range(start, start + n))

    async def worker() -> None:
        for i in ids:
            t = time.perf_counter()
            try:
                done = await client.chat.completions.create(
                    model=model, messages=_message(i), max_tokens=MAX_TOKENS
                )
            except openai.OpenAIError:
                counts["errors"] += 1
                continue
            done.choices[0].message.content  # noqa: B018
            latencies.append(time.perf_counter() - t)
            counts["ok"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return {**counts, "latencies": latencies}


def _write_input(path: Path, start: int, n: int) -> None:
    with path.open("wb") as f:
        for i in range(start, start + n):
            f.write(orjson.dumps({"id": f"r{i:07d}", "messages": _message(i)}) + b"\n")


async def _engine(
    base_url: str, model: str, start: int, n: int, concurrency: int, workdir: Path, cache: bool, name: str
) -> dict[str, Any]:
    from fairdistill.engine.config import EndpointConfig
    from fairdistill.engine.generate import generate

    inp = workdir / f"{name}.jsonl"
    out = workdir / name
    _write_input(inp, start, n)
    endpoint = EndpointConfig(
        base_url=base_url,
        model=model,
        concurrency=concurrency,
        timeout_s=120.0,
        max_attempts=6,
        name="default",
    )
    summary = await generate(inp, out, endpoint, max_tokens=MAX_TOKENS, cache=cache, progress=False)
    latencies = array("d")
    for shard in sorted((out / "trace").glob("*.jsonl")):
        for line in shard.read_bytes().splitlines():
            event = orjson.loads(line)
            if event.get("status") == 200 and not event.get("cache_hit"):
                latencies.append(event["latency_s"])
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    learned = (manifest.get("endpoints") or {}).get("default", {}).get("rate_rpm")
    return {
        "ok": summary["ok"],
        "errors": summary["failed"],
        "latencies": latencies,
        "engine_429": summary["http_429"],
        "engine_retries": summary["retries"],
        "learned_rpm": learned,
    }


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one arm in this process: warm-up, reset the sim, measure, report."""
    arm, base_url, model = spec["arm"], spec["base_url"], spec["model"]
    if spec.get("loop", "asyncio") == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # every asyncio.run below
    n, conc, warmup = spec["requests"], spec["concurrency"], spec.get("warmup", 0)
    workdir = Path(spec["workdir"])
    sim_url = base_url.removesuffix("/v1")

    async def one(start: int, count: int, label: str) -> dict[str, Any]:
        if arm == "bare":
            return await _bare(base_url, model, start, count, conc)
        if arm == "sdk":
            return await _sdk(base_url, model, start, count, conc)
        return await _engine(base_url, model, start, count, conc, workdir, spec.get("cache", True), label)

    if warmup:
        asyncio.run(one(10_000_000, warmup, "warmup"))
    if not spec.get("no_reset"):
        _http(f"{sim_url}/reset", "POST")
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = asyncio.run(one(0, n, "measured"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    server = _http(f"{sim_url}/stats?latency=1")
    client_q = _quantiles(result.pop("latencies"))
    server_q = server.get("server_latency_ms", {})
    done = result["ok"] + result["errors"]
    out = {
        "arm": arm,
        "requests": n,
        **result,
        "wall_s": round(wall, 3),
        "req_s": round(result["ok"] / wall, 1) if wall else 0.0,
        "cpu_us_per_req": round(cpu / max(1, done) * 1e6, 1),
        "client_p50_ms": round(client_q.get("p50", 0.0), 2),
        "client_p99_ms": round(client_q.get("p99", 0.0), 2),
        "server_p50_ms": server_q.get("p50"),
        "server_p99_ms": server_q.get("p99"),
        "added_p50_ms": round(client_q.get("p50", 0.0) - (server_q.get("p50") or 0.0), 2),
        "added_p99_ms": round(client_q.get("p99", 0.0) - (server_q.get("p99") or 0.0), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "server_requests": server.get("requests", 0),
        "server_429": server.get("http_429", 0),
    }
    return out


# -- the parent: simulator, children, table ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def simulator(workdir: Path, profile_text: str = SIM_PROFILE):
    """``fair sim`` with the bench profile in its own process; yields its base URL."""
    profile = workdir / "bench-profile.toml"
    profile.write_text(profile_text)
    port = _free_port()
    log = (workdir / "sim.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairdistill", "sim", "--profile", str(profile), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fair sim exited early: {(workdir / 'sim.log').read_text()[-2000:]}")
            try:
                _http(f"{url}/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run_child(spec: dict[str, Any], timeline_url: str | None = None) -> tuple[dict[str, Any], list]:
    """One arm in a fresh interpreter; optionally samples the sim's counters every second."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairdistill.benchmarks.throughput", "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    timeline: list[tuple[float, int, int, int]] = []
    while proc.poll() is None:
        if timeline_url:
            with contextlib.suppress(OSError):
                s = _http(f"{timeline_url}/stats")
                timeline.append(
                    (time.monotonic(), s.get("requests", 0), s.get("ok", 0), s.get("http_429", 0))
                )
        time.sleep(1.0 if timeline_url else 0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {spec['arm']} failed:\n{err.decode()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1]), timeline


def _limit_figures(timeline: list, after_s: float) -> dict[str, Any]:
    """Sustained accepted rate and 429 share after the first ``after_s`` seconds (server counters)."""
    # keep the samples after the last counter reset, from the first request on
    for i in range(len(timeline) - 1, 0, -1):
        if timeline[i][1] < timeline[i - 1][1]:
            timeline = timeline[i:]
            break
    timeline = [s for s in timeline if s[1] > 0]
    if len(timeline) < 3:
        return {}
    t_first = timeline[0][0]
    window = [s for s in timeline if s[0] - t_first >= after_s]
    # the last sample may come after the input ran out: end the window at the last rising sample
    while len(window) > 2 and window[-1][2] == window[-2][2]:
        window.pop()
    if len(window) < 2:
        return {}
    (t0, r0, ok0, l0), (t1, r1, ok1, l1) = window[0], window[-1]
    total_req, total_429 = timeline[-1][1], timeline[-1][3]
    return {
        "run_s": round(timeline[-1][0] - t_first, 1),
        "window_s": round(t1 - t0, 1),
        "sustained_req_s": round((ok1 - ok0) / (t1 - t0), 2),
        "limit_req_s": RPM_LIMIT / 60,
        "share_429_after": round((l1 - l0) / max(1, r1 - r0), 4),
        "share_429_total": round(total_429 / max(1, total_req), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "memory", False):
        return run_memory(args)
    chosen = [r.strip() for r in args.regimes.split(",") if r.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    loops = [x.strip() for x in args.loop.split(",") if x.strip()]
    if set(loops) - {"asyncio", "uvloop"}:
        print(f"fair bench throughput: --loop: unknown {args.loop!r} (asyncio, uvloop)", file=sys.stderr)
        return {"error": f"unknown loop {args.loop!r}", "exit_code": 2}
    specs = regimes(args.quick)
    rows: list[dict[str, Any]] = []
    verdicts: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="fair-bench-"))
    try:
        if "shapes" in chosen:
            shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
            unknown = sorted(set(shapes) - set(SHAPES))
            if unknown:
                print(
                    f"fair bench throughput: unknown --shapes {unknown} (have {', '.join(SHAPES)})",
                    file=sys.stderr,
                )
                return {"error": f"unknown shapes {unknown}", "exit_code": 2}
            rows += _run_shapes(specs["shapes"], shapes, workdir, args)
            verdicts.update(_shape_verdicts(rows))
            chosen = [r for r in chosen if r != "shapes"]
        with simulator(workdir) as base_url:
            for regime in chosen:
                spec = specs[regime]
                if regime == "limit":
                    rows.append(_run_limit(base_url, spec, workdir, args))
                    continue
                for arm, loop in [(a, lp) for a in arms for lp in loops]:
                    n = spec["sdk_requests"] if arm == "sdk" else spec["requests"]
                    child = {
                        "loop": loop,
                        "arm": arm,
                        "base_url": base_url,
                        "model": spec["model"],
                        "requests": n,
                        "concurrency": spec["concurrency"],
                        "warmup": min(1000, n // 10),
                        "workdir": str(workdir),
                        "cache": not args.no_cache,
                    }
                    print(
                        f"bench throughput: {regime} / {arm} / {loop} ({n} requests)...",
                        file=sys.stderr,
                        flush=True,
                    )
                    result, _ = _run_child(child)
                    rows.append({"regime": regime, **result, "loop": loop})
                    _clean(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for regime in ("overhead", "latency"):
        for loop in loops:  # each loop against the bare arm on the same loop
            by_arm = {r["arm"]: r for r in rows if r["regime"] == regime and r.get("loop") == loop}
            bare = by_arm.get("bare", {}).get("req_s")
            for arm in ("engine", "sdk"):
                if bare and arm in by_arm:
                    by_arm[arm]["vs_bare"] = round(by_arm[arm]["req_s"] / bare, 3)
            if bare and "engine" in by_arm:
                key = regime if loop == loops[0] else f"{regime}_{loop}"
                verdicts[key] = {
                    "loop": loop,
                    "engine_vs_bare": by_arm["engine"]["vs_bare"],
                    "cpu_per_req_vs_bare": round(
                        by_arm["engine"]["cpu_us_per_req"] / max(1e-9, by_arm["bare"]["cpu_us_per_req"]), 2
                    ),
                    "cpu_target": TARGETS["cpu_per_req_vs_bare"],
                    "target": TARGETS[regime],
                    "pass": by_arm["engine"]["vs_bare"] >= TARGETS[regime],
                }
    limit = next((r for r in rows if r["regime"] == "limit"), None)
    if limit and "sustained_req_s" in limit:
        share = limit["sustained_req_s"] / limit["limit_req_s"]
        verdicts["limit"] = {
            "engine_vs_limit": round(share, 3),
            "share_429_after": limit["share_429_after"],
            "target": f">= {TARGETS['limit']:.0%} of limit, < {TARGETS['limit_429_share']:.0%} 429",
            "pass": share >= TARGETS["limit"] and limit["share_429_after"] < TARGETS["limit_429_share"],
        }
    return {
        "rows": rows,
        "verdicts": verdicts,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "engine_cache": not args.no_cache,
        "exit_code": 0,
    }


def _run_limit(
    base_url: str, spec: dict[str, Any], workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    rate = RPM_LIMIT / 60
    # enough input to outlast the run at the limit: the bucket's burst plus rate * duration
    n = int(rate * 10 + rate * spec["duration_s"])
    child = {
        "arm": "engine",
        "base_url": base_url,
        "model": spec["model"],
        "requests": n,
        "concurrency": spec["concurrency"],
        "warmup": 0,
        "workdir": str(workdir),
        "cache": not args.no_cache,
    }
    print(
        f"bench throughput: limit / engine ({n} requests, hidden {RPM_LIMIT} rpm, "
        f"~{spec['duration_s']} s)...",
        file=sys.stderr,
        flush=True,
    )
    result, timeline = _run_child(child, timeline_url=base_url.removesuffix("/v1"))
    _clean(workdir)
    # at the limit a call's latency is its wait in admission (Little's law), not client overhead
    result["queued_p50_ms"] = result.pop("added_p50_ms")
    result["queued_p99_ms"] = result.pop("added_p99_ms")
    return {"regime": "limit", **result, **_limit_figures(timeline, spec["measure_after_s"])}


def _run_shapes(
    spec: dict[str, Any], shapes: list[str], workdir: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The engine, told nothing, against each hidden limit shape; figures from server counters."""
    rows = []
    window, n, conc = spec["window_s"], spec["requests"], spec["concurrency"]
    with simulator(workdir, shape_profile(window)) as base_url:
        for shape in shapes:
            ideal = ideal_s(shape, n, window, conc)
            print(
                f"bench throughput: shapes / {shape} ({n} requests, hidden {SHAPE_RPM} rpm, "
                f"{window:g} s, no headers; ideal {ideal:.1f} s)...",
                file=sys.stderr,
                flush=True,
            )
            child = {
                "arm": "engine",
                "base_url": base_url,
                "model": shape,
                "requests": n,
                "concurrency": conc,
                "warmup": 0,
                "workdir": str(workdir),
                "cache": not args.no_cache,
            }
            result, timeline = _run_child(child, timeline_url=base_url.removesuffix("/v1"))
            _clean(workdir)
            result["queued_p50_ms"] = result.pop("added_p50_ms")
            result["queued_p99_ms"] = result.pop("added_p99_ms")
            http = max(1, result["server_requests"])
            rows.append(
                {
                    "regime": "shapes",
                    "shape": shape,
                    **result,
                    "ideal_s": round(ideal, 1),
                    "vs_ideal": round(result["wall_s"] / ideal, 3),
                    "share_429": round(result["server_429"] / http, 4),
                    "ok_per_10s": _per_10s(timeline),
                }
            )
    return rows


def _per_10s(timeline: list) -> list[int]:
    """Calls answered 200 in each 10 s of the run (server counters, sampled every second)."""
    for i in range(len(timeline) - 1, 0, -1):  # after the last counter reset
        if timeline[i][1] < timeline[i - 1][1]:
            timeline = timeline[i:]
            break
    if not timeline:
        return []
    t0, out, last = timeline[0][0], [], 0
    for t, _, ok, _ in timeline:
        k = int((t - t0) // 10)
        while len(out) <= k:
            out.append(0)
        out[k] += ok - last
        last = ok
    return out


def _shape_verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for r in rows:
        if r.get("regime") != "shapes":
            continue
        out[f"shape_{r['shape']}"] = {
            "vs_ideal": r["vs_ideal"],
            "share_429": r["share_429"],
            "target": f"<= {TARGETS['shape_vs_ideal']}x ideal, < {TARGETS['shape_429_share']:.0%} 429",
            "pass": r["errors"] == 0
            and r["vs_ideal"] <= TARGETS["shape_vs_ideal"]
            and r["share_429"] < TARGETS["shape_429_share"],
        }
    return out


def _clean(workdir: Path) -> None:
    for p in workdir.iterdir():
        if p.name in ("bench-profile.toml", "sim.log"):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# -- memory ------------------------------------------------------------------------------------

MAX_BYTES_PER_RECORD = 200  # RSS growth per record beyond the id index, cache on


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _id_index_mb(n: int) -> float:
    """What an in-memory set of ``n`` record ids costs (the store's resume index)."""
    tracemalloc.start()
    ids = {f"r{i:07d}" for i in range(n)}
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del ids
    return size / 1024**2


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    total = 40_000 if args.quick else args.records
    first = total // 10
    workdir = Path(tempfile.mkdtemp(prefix="fair-bench-mem-"))
    samples: list[tuple[int, float]] = []
    try:
        with simulator(workdir) as base_url:
            sim = base_url.removesuffix("/v1")
            _http(f"{sim}/reset", "POST")
            child = {
                "arm": "engine",
                "base_url": base_url,
                "model": "fast",
                "requests": total,
                "concurrency": 256,
                "warmup": 0,
                "workdir": str(workdir),
                "cache": not args.no_cache,
                "no_reset": True,
            }
            print(f"bench throughput --memory: generate over {total} records...", file=sys.stderr, flush=True)
            proc = subprocess.Popen(
                [sys.executable, "-m", "fairdistill.benchmarks.throughput", "--child", json.dumps(child)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            while proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    ok = _http(f"{sim}/stats").get("ok", 0)
                    samples.append((ok, _rss_mb(proc.pid)))
                time.sleep(0.25)
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"bench child failed:\n{err.decode()[-3000:]}")
            result = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # RSS while generating: the first sample past ``first`` records and the last one before the
    # final record (closing the run afterwards hashes its shards, which is not steady state)
    start = next(((ok, rss) for ok, rss in samples if ok >= first), None)
    end = next(((ok, rss) for ok, rss in reversed(samples) if ok < total), None)
    if start is None or end is None or end[0] < 0.9 * total:
        raise RuntimeError(f"bench --memory: too few RSS samples ({len(samples)})")
    (first_ok, at_first), (end_ok, at_end) = start, end
    index_mb = _id_index_mb(end_ok) - _id_index_mb(first_ok)
    growth = at_end - at_first
    beyond = round(growth - index_mb, 1)
    per_record = (growth - index_mb) * 1024**2 / max(1, end_ok - first_ok)
    slack_mb = MAX_BYTES_PER_RECORD * (end_ok - first_ok) / 1024**2
    return {
        "records": total,
        "req_s": result["req_s"],
        "rss_mb_at": {str(first_ok): _round(at_first), str(end_ok): _round(at_end)},
        "rss_growth_mb": round(growth, 1),
        "id_index_growth_mb": round(index_mb, 1),
        "growth_beyond_index_mb": beyond,
        "allowed_beyond_index_mb": round(slack_mb, 1),
        "beyond_index_bytes_per_record": round(per_record),
        "allowed_bytes_per_record": MAX_BYTES_PER_RECORD,
        "pass": per_record <= MAX_BYTES_PER_RECORD,
        "peak_rss_mb": result["peak_rss_mb"],
        "exit_code": 0,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- table -------------------------------------------------------------------------------------

COLUMNS = [
    "regime",
    "arm",
    "loop",
    "ok",
    "errors",
    "req_s",
    "vs_bare",
    "cpu_us_per_req",
    "added_p50_ms",
    "added_p99_ms",
    "peak_rss_mb",
]
LIMIT_COLUMNS = [
    "run_s",
    "window_s",
    "sustained_req_s",
    "limit_req_s",
    "share_429_after",
    "share_429_total",
    "queued_p50_ms",
]

SHAPE_COLUMNS = [
    "shape",
    "ok",
    "errors",
    "wall_s",
    "ideal_s",
    "vs_ideal",
    "server_requests",
    "server_429",
    "share_429",
    "cpu_us_per_req",
]


def table(result: dict[str, Any]) -> str:
    from fairdistill.benchmarks import format_result, format_table

    if "rows" not in result:
        return format_result(result)
    others = [r for r in result["rows"] if r["regime"] != "shapes"]
    parts = [format_table(others, COLUMNS)] if others else []
    shapes = [r for r in result["rows"] if r["regime"] == "shapes"]
    if shapes:
        parts.append(
            "hidden limit shapes, no rate-limit headers (server counters):\n"
            + format_table(shapes, SHAPE_COLUMNS)
            + "\n200s per 10 s: "
            + "; ".join(f"{r['shape']}: {r['ok_per_10s']}" for r in shapes)
        )
    limit = [r for r in result["rows"] if r["regime"] == "limit"]
    if limit:
        parts.append(
            "limit-bound (server counters):\n" + format_table(limit, [*LIMIT_COLUMNS, "learned_rpm"])
        )
    for regime, v in result.get("verdicts", {}).items():
        parts.append(f"{regime}: " + ", ".join(f"{k}={val}" for k, val in v.items()))
    return "\n\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: fair bench throughput [--quick] [--json] [--regimes ...] [--arms ...] [--memory]")
