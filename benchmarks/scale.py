"""``fair bench scale``: the same job on one process and on Ray, against ``fair sim`` in its own process.

Every arm is the real command (``fair generate`` / ``fair run``) in a child process; Ray arms
join one Ray head this benchmark starts (``ray start --head --block`` on 127.0.0.1, its own
process group, killed at the end), so start-up is measured once, apart, as ``ray_start_s``
(joining the cluster and starting the limiter and the workers), and rates exclude it (and
Ray's shut-down, ``ray_stop_s`` in the run's manifest).

Arms (``--quick``: smaller, in brackets):

1. **overhead**: 20k [4k] lines, 0 ms latency: single process vs Ray with 1 and 2 workers.
   Target: Ray 1 worker >= 0.6x single. Gives ``per_worker_rps`` and ``overhead_us_per_record``.
2. **latency**: 6k [2k] lines, 300 ms, global concurrency 256: single vs 2 workers; >= 0.95x.
3. **configured rpm**: ``--rpm 3000`` shared by 2 workers for 40 s [20 s] against a server
   enforcing 3,000 rpm: every 10 s window <= 1.02x the limit, >= 0.95x sustained.
4. **hidden rpm**: 3,000 rpm without any rate-limit header, 2 workers, 60 s [30 s]: after 30 s
   [15 s] >= 0.95x the limit with < 2 % 429s.
5. **FAIR**: 100 [30] problems against the committee profile (faults off, so the calls are
   the same every run): single vs 2 workers vs 2 workers with one SIGKILLed at ~40 %:
   identical records, and ``repaid_calls_after_kill`` (server 200s beyond the clean run's).

Records are compared by a canonical fingerprint per kind (sorted records; the trace, and
``problems.calls``, which counts calls made in *this* attempt, excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from fairdistill.benchmarks.throughput import _http, simulator
from fairdistill.engine.rundir.store import iter_raw, read_manifest

RPM = 3000
TARGETS = {
    "ray1_vs_single_0ms": 0.6,
    "ray2_vs_single_300ms": 0.95,
    "rpm_window_max": 1.02,
    "rpm_sustained_min": 0.95,
    "hidden_sustained_min": 0.95,
    "hidden_429_share_max": 0.02,
}
PROFILE = f"""
name = "bench-scale"
seed = 1
[models.fast]
content = "echo"
[models.slow]
content = "echo"
latency_ms = 300
[models.limited]
content = "echo"
latency_ms = 100
rpm = {RPM}
limit_burst_s = 1
[models.hidden]
content = "echo"
latency_ms = 100
rpm = {RPM}
limit_burst_s = 1
limit_headers = false
"""
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keep a one-host Ray on 127.0.0.1
SAMPLE_S = 0.2  # the simulator's counters are read this often (a 10 s window is exact to ~2 %)
VOLATILE = {"problems": ("calls",)}  # per-attempt counters, not content


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arms", default="overhead,latency,rpm,hidden,fair", help="comma list")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "overhead": 4000,
            "latency": 2000,
            "rpm_s": 20,
            "hidden_s": 30,
            "hidden_after": 15,
            "fair": 30,
            "fair_block": 5,
            "block": 500,
        }
    return {
        "overhead": 20000,
        "latency": 6000,
        "rpm_s": 40,
        "hidden_s": 60,
        "hidden_after": 30,
        "fair": 100,
        "fair_block": 10,
        "block": 1000,
    }


# -- helpers ----------------------------------------------------------------------------------


def fingerprint(run_dir: Path, kinds: list[str]) -> dict[str, str]:
    """sha256 per kind over the records sorted by id (volatile fields dropped)."""
    out = {}
    for kind in kinds:
        rows = sorted(iter_raw(run_dir, kind), key=lambda r: r["id"])
        for r in rows:
            for key in VOLATILE.get(kind, ()):
                r.pop(key, None)
        out[kind] = hashlib.sha256(orjson.dumps(rows, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return out


@contextlib.contextmanager
def ray_head(workdir: Path) -> Iterator[str]:
    """A 2-CPU Ray head on 127.0.0.1 in its own process group; yields its address."""
    port = _port(19740, 19760)
    log = workdir / "ray-head.log"
    temp = Path(f"/tmp/fair-ray-{port}")
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.1",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        "--temp-dir",
        f"/tmp/fair-ray-{port}",
        "--min-worker-port",
        "19760",
        "--max-worker-port",
        "19799",
    ]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **LOOPBACK}
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(3)
        with contextlib.suppress(ProcessLookupError):  # what SIGTERM left of the group (gcs, workers)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _port(lo: int, hi: int) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi - 1}")


def fair(args: list[str], sim: str | None = None, watch=None) -> tuple[int, str, list]:  # type: ignore[no-untyped-def]
    """``fair ARGS`` in a child; samples the simulator's counters every ``SAMPLE_S``; ``watch()`` True
    kills (SIGKILL) the child's process group."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairdistill", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **LOOPBACK},
        start_new_session=True,
    )
    timeline: list[tuple[float, int, int, int]] = []
    last = 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if sim and now - last >= SAMPLE_S:
            last = now
            with contextlib.suppress(OSError):
                s = _http(f"{sim}/stats")
                timeline.append((now, s.get("requests", 0), s.get("ok", 0), s.get("http_429", 0)))
        if watch is not None and watch():
            watch = None
        time.sleep(0.05)
    err = proc.stderr.read().decode() if proc.stderr else ""
    return proc.returncode, err, timeline


def gen_args(base: str, model: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--endpoint",
        base,
        "--model",
        model,
        "--input",
        str(inp),
        "--output",
        str(out),
        "--no-progress",
        "--max-tokens",
        "16",
        *extra,
    ]


def write_input(path: Path, n: int) -> Path:
    with open(path, "wb") as f:
        for i in range(n):
            f.write(orjson.dumps({"id": f"q{i}", "prompt": f"question {i}: say something short"}) + b"\n")
    return path


def rate_of(out: Path) -> tuple[float, float]:
    """(records/s excluding start-up, start-up s) from a run's manifest."""
    m = read_manifest(out) or {}
    g = m.get("generate", {})
    ray = g.get("ray")
    done = g.get("ok", 0) + g.get("failed", 0)
    if ray:
        return done / max(ray["run_s"], 1e-9), ray["ray_start_s"]
    return done / max(g.get("elapsed_s", 0.0), 1e-9), 0.0


def windows(timeline: list, width: float = 10.0) -> list[float]:
    """Calls answered 200 in each full ``width`` s window from the first request on."""
    tl = [s for s in timeline if s[1] > 0]
    if len(tl) < 2:
        return []
    out, t0 = [], tl[0][0]
    k = 1
    base = tl[0][2]
    for t, _, ok, _ in tl:
        if t - t0 >= k * width:
            out.append(ok - base)
            base, k = ok, k + 1
    return out


def sustained(timeline: list, after_s: float) -> tuple[float, float]:
    """(ok/s, 429 share) after ``after_s`` s from the first request, until the last rising sample."""
    tl = [s for s in timeline if s[1] > 0]
    if len(tl) < 3:
        return 0.0, 0.0
    w = [s for s in tl if s[0] - tl[0][0] >= after_s]
    while len(w) > 2 and w[-1][2] == w[-2][2]:
        w.pop()
    if len(w) < 2:
        return 0.0, 0.0
    (t0, r0, ok0, l0), (t1, r1, ok1, l1) = w[0], w[-1]
    return (ok1 - ok0) / (t1 - t0), (l1 - l0) / max(1, r1 - r0)


def _check(code: int, err: str, what: str, ok: tuple[int, ...] = (0,)) -> None:
    if code not in ok:
        raise RuntimeError(f"{what}: exit {code}: {err[-2000:]}")


def _say(text: str) -> None:
    print(f"bench scale: {text}", file=sys.stderr, flush=True)


# -- the arms ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fairdistill.engine.scale import import_ray

    import_ray()  # ConfigError (exit 2) with the install line when ray is missing
    s = sizes(args.quick)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    work = Path(tempfile.mkdtemp(prefix="fair-bench-scale-"))
    result: dict[str, Any] = {"sizes": s, "targets": TARGETS}
    same: dict[str, bool] = {}
    try:
        with simulator(work, PROFILE) as base, ray_head(work) as address:
            sim = base.removesuffix("/v1")
            ray = ["--ray", address, "--block-size", str(s["block"])]
            if "overhead" in arms:
                inp = write_input(work / "overhead.jsonl", s["overhead"])
                rates, prints = {}, {}
                for arm, extra in (
                    ("single", []),
                    ("ray1", [*ray, "--workers", "1"]),
                    ("ray2", [*ray, "--workers", "2"]),
                ):
                    _http(f"{sim}/reset", "POST")
                    out = work / f"overhead-{arm}"
                    _say(f"overhead / {arm} ({s['overhead']} lines, 0 ms)...")
                    code, err, _ = fair(
                        gen_args(base, "fast", inp, out, "--concurrency", "256", "--no-cache", *extra)
                    )
                    _check(code, err, f"overhead {arm}")
                    rates[arm], start = rate_of(out)
                    if start:
                        result.setdefault("ray_start_s", round(start, 2))
                    prints[arm] = fingerprint(out, ["responses"])
                    shutil.rmtree(out, ignore_errors=True)
                same["overhead"] = prints["single"] == prints["ray1"] == prints["ray2"]
                result["overhead"] = {k: round(v, 1) for k, v in rates.items()}
                result["per_worker_rps"] = round(rates["ray1"], 1)
                result["overhead_us_per_record"] = round((1 / rates["ray1"] - 1 / rates["single"]) * 1e6, 1)
                result["ray1_vs_single_0ms"] = round(rates["ray1"] / rates["single"], 3)
                result["ray2_vs_single_0ms"] = round(rates["ray2"] / rates["single"], 3)
            if "latency" in arms:
                inp = write_input(work / "latency.jsonl", s["latency"])
                rates, prints = {}, {}
                for arm, extra in (("single", []), ("ray2", [*ray, "--workers", "2"])):
                    _http(f"{sim}/reset", "POST")
                    out = work / f"latency-{arm}"
                    _say(f"latency / {arm} ({s['latency']} lines, 300 ms, concurrency 256)...")
                    code, err, _ = fair(
                        gen_args(base, "slow", inp, out, "--concurrency", "256", "--no-cache", *extra)
                    )
                    _check(code, err, f"latency {arm}")
                    rates[arm], _ = rate_of(out)
                    prints[arm] = fingerprint(out, ["responses"])
                    shutil.rmtree(out, ignore_errors=True)
                same["latency"] = prints["single"] == prints["ray2"]
                result["latency"] = {k: round(v, 1) for k, v in rates.items()}
                result["ray2_vs_single_300ms"] = round(rates["ray2"] / rates["single"], 3)
            adherence: dict[str, Any] = {}
            if "rpm" in arms:
                n = int(RPM / 60 * s["rpm_s"])
                inp = write_input(work / "rpm.jsonl", n)
                _http(f"{sim}/reset", "POST")
                _say(f"configured rpm / ray2 ({n} lines at --rpm {RPM}, ~{s['rpm_s']} s)...")
                out = work / "rpm"
                code, err, tl = fair(
                    gen_args(
                        base,
                        "limited",
                        inp,
                        out,
                        "--rpm",
                        str(RPM),
                        "--concurrency",
                        "64",
                        *ray,
                        "--workers",
                        "2",
                        "--block-size",
                        str(max(50, n // 8)),
                    ),
                    sim,
                )
                _check(code, err, "rpm")
                limit10 = RPM / 60 * 10
                w = windows(tl)
                rate, _ = sustained(tl, 5.0)
                adherence["configured"] = {
                    "windows_10s": w,
                    "window_max_vs_limit": round(max(w) / limit10, 3) if w else None,
                    "sustained_vs_limit": round(rate / (RPM / 60), 3),
                }
                shutil.rmtree(out, ignore_errors=True)
            if "hidden" in arms:
                n = int(RPM / 60 * (s["hidden_s"] + 10))
                inp = write_input(work / "hidden.jsonl", n)
                _http(f"{sim}/reset", "POST")
                _say(f"hidden rpm / ray2 ({n} lines, hidden {RPM} rpm, no headers, ~{s['hidden_s']} s)...")
                out = work / "hidden"
                code, err, tl = fair(
                    gen_args(
                        base,
                        "hidden",
                        inp,
                        out,
                        "--concurrency",
                        "64",
                        *ray,
                        "--workers",
                        "2",
                        "--block-size",
                        str(max(50, n // 8)),
                    ),
                    sim,
                )
                _check(code, err, "hidden")
                rate, share = sustained(tl, s["hidden_after"])
                adherence["hidden"] = {
                    "sustained_vs_limit": round(rate / (RPM / 60), 3),
                    "share_429": round(share, 4),
                }
                shutil.rmtree(out, ignore_errors=True)
            result["rpm_adherence"] = adherence
        if "fair" in arms:
            same["fair"] = _fair_arms(work, s, result)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["same_output_as_single_process"] = same
    result["verdicts"] = _verdicts(result)
    result["exit_code"] = 0 if all(result["verdicts"].values()) and all(same.values()) else 1
    return result


def _fair_arms(work: Path, s: dict[str, Any], result: dict[str, Any]) -> bool:
    """FAIR on the committee profile (faults off): single, 2 workers, 2 workers with a kill."""
    from fairdistill.engine.sim import profiles  # the profile files live beside it

    committee = (Path(profiles.__file__).parent / "profiles" / "committee.toml").read_text()
    # faults off, so every run makes the same calls; latency and limits as they are
    text = re.sub(r"\[models\.[\w-]+\.faults\][^\[]*", "", committee)
    prints, ok_calls = {}, {}
    with simulator(work, 'dataset = "builtin"\n' + text) as base:
        sim = base.removesuffix("/v1")
        cfg = work / "fair.toml"
        cfg.write_text(_fair_config(base, s["fair"]))
        with ray_head(work) as address:
            for arm in ("single", "ray2", "ray2_kill"):
                _http(f"{sim}/reset", "POST")
                out = work / f"fair-{arm}"
                extra = (
                    []
                    if arm == "single"
                    else ["--ray", address, "--workers", "2", "--block-size", str(s["fair_block"])]
                )
                watch = _killer(out, s["fair"]) if arm == "ray2_kill" else None
                _say(f"FAIR / {arm} ({s['fair']} problems, committee profile)...")
                code, err, _ = fair(
                    ["run", str(cfg), "--run-dir", str(out), "--no-progress", *extra], sim, watch
                )
                _check(code, err, f"fair {arm}", ok=(0, 1))
                prints[arm] = fingerprint(
                    out, ["attempts", "rationales", "feedback", "reviews", "samples", "problems"]
                )
                ok_calls[arm] = _http(f"{sim}/stats").get("ok", 0)
                if arm == "ray2_kill":
                    result["fair_workers_lost"] = (
                        (read_manifest(out) or {}).get("ray", {}).get("workers_lost")
                    )
    result["fair_ok_calls"] = ok_calls
    result["repaid_calls_after_kill"] = ok_calls["ray2_kill"] - ok_calls["ray2"]
    return prints["single"] == prints["ray2"] == prints["ray2_kill"]


def _killer(out: Path, total: int):  # type: ignore[no-untyped-def]
    """SIGKILL worker w0 once ~40 % of the problems are done."""

    def watch() -> bool:
        done = sum(p.read_bytes().count(b"\n") for p in (out / "problems").glob("shard-*"))
        if done >= 0.4 * total:
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int((out / "blocks" / "pids" / "w0").read_text().split()[0]), signal.SIGKILL)
                return True
        return False

    return watch


def _fair_config(base: str, n: int) -> str:
    teachers = ["gpt-sim", "claude-sim", "gemini-sim"]
    eps = "\n".join(
        f'[endpoints.{t}]\nbase_url = "{base}"\nmodel = "{t}"\ntimeout_s = 20\nconcurrency = 64\n'
        for t in teachers
    )
    return (
        f'[dataset]\nname = "builtin"\nlimit = {n}\n\n[student]\nendpoint = "student"\nattempts = 2\n'
        f"temperature = 0.7\n\n[teachers]\nendpoints = {orjson.dumps(teachers).decode()}\n\n"
        f'[endpoints.student]\nbase_url = "{base}"\nmodel = "student-sim"\n\n{eps}'
    )


def _verdicts(r: dict[str, Any]) -> dict[str, bool]:
    v: dict[str, bool] = {}
    if "ray1_vs_single_0ms" in r:
        v["ray1_vs_single_0ms"] = r["ray1_vs_single_0ms"] >= TARGETS["ray1_vs_single_0ms"]
    if "ray2_vs_single_300ms" in r:
        v["ray2_vs_single_300ms"] = r["ray2_vs_single_300ms"] >= TARGETS["ray2_vs_single_300ms"]
    a = r.get("rpm_adherence", {})
    if "configured" in a:
        wmax = a["configured"]["window_max_vs_limit"]
        v["rpm_window_max"] = wmax is not None and wmax <= TARGETS["rpm_window_max"]
        v["rpm_sustained"] = a["configured"]["sustained_vs_limit"] >= TARGETS["rpm_sustained_min"]
    if "hidden" in a:
        v["hidden_sustained"] = a["hidden"]["sustained_vs_limit"] >= TARGETS["hidden_sustained_min"]
        v["hidden_429"] = a["hidden"]["share_429"] < TARGETS["hidden_429_share_max"]
    return v


def table(r: dict[str, Any]) -> str:
    lines = ["fair bench scale" + (" (quick)" if r.get("quick") else ""), ""]
    if "overhead" in r:
        o = r["overhead"]
        lines.append(
            f"0 ms:     single {o['single']:.0f} rec/s | Ray 1 worker {o['ray1']:.0f} "
            f"({r['ray1_vs_single_0ms']:.2f}x, target >= 0.6) | 2 workers {o['ray2']:.0f} "
            f"({r['ray2_vs_single_0ms']:.2f}x)"
        )
        lines.append(
            f"          per worker {r['per_worker_rps']:.0f} rec/s; "
            f"overhead {r['overhead_us_per_record']:.0f} us/record; "
            f"Ray start-up {r.get('ray_start_s', 0):.1f} s (apart)"
        )
        pw = r["per_worker_rps"]
        need = ", ".join(f"{t:,} rec/s -> {math.ceil(t / pw)} workers" for t in (1_000, 10_000, 100_000))
        lines.append(f"          workers needed (at the measured per-worker rate): {need}")
    if "latency" in r:
        o = r["latency"]
        lines.append(
            f"300 ms:   single {o['single']:.0f} rec/s | Ray 2 workers {o['ray2']:.0f} "
            f"({r['ray2_vs_single_300ms']:.2f}x, target >= 0.95)"
        )
    a = r.get("rpm_adherence", {})
    if "configured" in a:
        c = a["configured"]
        lines.append(
            f"--rpm {RPM} over 2 workers: 10 s windows {c['windows_10s']} (max {c['window_max_vs_limit']}x "
            f"the limit, target <= 1.02); sustained {c['sustained_vs_limit']}x (>= 0.95)"
        )
    if "hidden" in a:
        h = a["hidden"]
        lines.append(
            f"hidden {RPM} rpm, 2 workers: sustained {h['sustained_vs_limit']}x (>= 0.95), "
            f"429s {h['share_429'] * 100:.2f} % (< 2 %)"
        )
    if "fair_ok_calls" in r:
        lines.append(
            f"FAIR: server 200s {r['fair_ok_calls']}; repaid after a kill {r['repaid_calls_after_kill']}"
        )
    lines.append(f"same output as single process: {r['same_output_as_single_process']}")
    lines.append(f"verdicts: {r['verdicts']}")
    return "\n".join(lines)
