"""``fair bench keys``: one endpoint, a pool of three API keys, against ``fair sim --profile keys``.

The simulator's ``keys`` profile holds keys ``a`` and ``b`` in organisation ``org-ab`` and ``c``
alone: each key has a hidden 1,000 rpm, ``org-ab`` a hidden 1,500 rpm, no rate-limit header, so
the most the pool can get is 1,500 + 1,000 = **2,500 rpm**. Every arm is the real ``fair
generate --key VAR@GROUP ...`` in a child process (the variables hold the simulator's key values,
never printed), the simulator in its own process. Sizes (``--quick`` in brackets):

1. **throughput**: 2,500 [625] lines (~60 s [~15 s] at 2,500 rpm), concurrency 64: the rate the
   simulator answered 200 after a warm-up of 20 s [5 s] and until 90 % of the lines are answered
   (then the queues drain: fewer calls wait than the keys could take), its ``/stats`` counters
   sampled every 0.2 s as ``fair bench scale`` does: >= 0.95 x 2,500 rpm with < 2 % 429s.
2. **revoke**: the same with key ``b`` revoked (``POST /sim/keys/b/revoke``) once 40 % of the
   lines were answered: no failed record, and every call that ended more than ``GRACE_S`` after
   the revocation was served by ``a`` or ``c`` (the trace's ``key``, the variable's name).
3. **ray**: the throughput arm with ``--ray --workers 2`` (a local Ray the run starts): global
   adherence = the most calls the simulator answered 200 in any sliding window (60 s [10 s, after
   the warm-up]) per key and per group over that key's or group's hidden limit <= 1.02; timestamps
   from the trace of every worker. 75 s [15 s] of lines.
4. **affinity**: 500 [100] problems x 4 prompts sharing a ~1,100-token first message, once with
   key affinity and once with ``--no-key-affinity``: the share of prompt tokens the simulator
   billed as cached (its prompt caches are per organisation) must gain >= 0.1 with affinity.

Every run directory and child's stderr is searched for the key values: ``key_values_in_output``
must be 0. The JSON keys are stable; ``verdicts`` holds one boolean per target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fairdistill.benchmarks.scale import LOOPBACK, SAMPLE_S, gen_args, sustained, write_input
from fairdistill.benchmarks.throughput import _http, simulator
from fairdistill.engine.errors import FairError, UsageError
from fairdistill.engine.rundir.store import iter_raw

ACHIEVABLE_RPM = 2500
REVOKED = "b"  # the key revoked in the revoke arm (the profile's label)
TARGETS = {
    "throughput_ratio_min": 0.95,
    "share_429_max": 0.02,
    "ray_adherence_max": 1.02,
    "affinity_gain_min": 0.1,
}
REVOKE_AT = 0.4  # of the lines answered
BACKLOGGED = 0.9  # sustained rates end when this share of the lines is answered (then the queues drain)
GRACE_S = 2.0  # calls ending this soon after the revocation may have been let through before it
PREFIX_TOKENS = 1100  # a problem's shared first message (over OpenAI's 1,024-token cache minimum)
VARIANTS = 4  # prompts per problem in the affinity arm
ARMS = ("throughput", "revoke", "ray", "affinity")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of " + ", ".join(ARMS))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")


def sizes(quick: bool) -> dict[str, Any]:
    """Seconds of lines at the achievable rate per arm, the warm-up, the window, the problems."""
    if quick:
        return {"secs": 15, "warmup_s": 5, "ray_secs": 15, "window_s": 10, "problems": 100}
    return {"secs": 60, "warmup_s": 20, "ray_secs": 75, "window_s": 60, "problems": 500}


@dataclass(frozen=True)
class SimKey:
    """A key of the `keys` profile: its label there, the variable the pool reads it from, its
    organisation (None: its own), its value (only ever put in the children's environment) and
    its hidden rpm."""

    label: str
    env: str
    group: str | None
    value: str
    rpm: float


@dataclass(frozen=True)
class Pool:
    """The profile's keys and the hidden rpm of its organisations that have one."""

    keys: tuple[SimKey, ...]
    groups: dict[str, float]

    def flags(self) -> list[str]:
        """``--key VAR@GROUP`` per key, as a user with these keys would write them."""
        return [f"--key={k.env}@{k.group}" if k.group else f"--key={k.env}" for k in self.keys]

    def env(self, label: str) -> str:
        return next(k.env for k in self.keys if k.label == label)

    def achievable_rpm(self) -> float:
        """Per organisation, the lesser of its limit and its keys' sum; added up."""
        orgs: dict[str, float] = {}
        for k in self.keys:
            orgs[k.group or k.label] = orgs.get(k.group or k.label, 0.0) + k.rpm
        return sum(min(rpm, self.groups.get(org, rpm)) for org, rpm in orgs.items())


@dataclass
class Bench:
    """One benchmark run: its folder, the simulator, the pool's environment, what was found."""

    work: Path
    base: str  # the simulator's /v1 URL
    model: str
    pool: Pool
    s: dict[str, Any]
    keep: bool = False
    leaks: int = 0

    @property
    def sim(self) -> str:
        return self.base.removesuffix("/v1")

    def lines(self, secs: float) -> int:
        return int(ACHIEVABLE_RPM / 60 * secs)

    def generate(self, name: str, inp: Path, *extra: str, watch: Callable | None = None) -> Arm:
        """``fair generate`` with the pool over ``inp`` into ``work/name``, the simulator reset."""
        _http(f"{self.sim}/reset", "POST")
        out = self.work / name
        flags = ["--concurrency", "64", "--no-cache", *self.pool.flags()]
        args = gen_args(self.base, self.model, inp, out, *flags, *extra)
        _say(f"{name}: {sum(1 for _ in inp.open())} lines...")
        env = {k.env: k.value for k in self.pool.keys}
        code, err, timeline = run_fair(args, self.sim, env, watch)
        arm = Arm(out, code, err, timeline, trace_rows(out))
        self.leaks += leaked(out, err, [k.value for k in self.pool.keys])
        return arm

    def done(self, arm: Arm) -> None:
        if not self.keep:
            shutil.rmtree(arm.out, ignore_errors=True)


@dataclass
class Arm:
    """What one ``fair generate`` left: its folder, exit code, stderr, the simulator's counters
    sampled every ``SAMPLE_S`` (t, requests, ok, 429s) and its trace lines."""

    out: Path
    code: int
    err: str
    timeline: list[tuple[float, int, int, int]]
    trace: list[dict[str, Any]]

    def check(self, what: str, ok: tuple[int, ...] = (0,)) -> None:
        if self.code not in ok:
            tail = " | ".join(self.err.strip().splitlines()[-3:])
            raise FairError(f"bench keys: {what}: fair generate exited {self.code}: {tail}")

    def manifest(self) -> dict[str, Any]:
        path = self.out / "manifest.json"
        return (orjson.loads(path.read_bytes()) if path.is_file() else {}).get("generate", {})


# -- helpers ----------------------------------------------------------------------------------


def run_fair(args: list[str], sim: str, env: dict[str, str], watch: Callable | None = None) -> tuple:
    """``fair ARGS`` in a child with ``env`` added; samples the simulator's ``/stats`` every
    ``SAMPLE_S``; ``watch(timeline)`` is called until it returns True."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairdistill", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **LOOPBACK, **env},
        start_new_session=True,
    )
    timeline: list[tuple[float, int, int, int]] = []
    last = 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if now - last >= SAMPLE_S:
            last = now
            with contextlib.suppress(OSError):
                s = _http(f"{sim}/stats")
                timeline.append((now, s.get("requests", 0), s.get("ok", 0), s.get("http_429", 0)))
        if watch is not None and watch(timeline):
            watch = None
        time.sleep(0.05)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return proc.returncode, err, timeline


def trace_rows(out: Path) -> list[dict[str, Any]]:
    """Every trace line of a run directory (every worker's), oldest first."""
    if not (out / "manifest.json").is_file():
        return []
    return sorted(iter_raw(out, "trace"), key=lambda r: r.get("ts", 0.0))


def leaked(out: Path, err: str, keys: list[str]) -> int:
    """How many files of ``out`` (and the child's stderr) hold one of the ``keys`` values."""
    values = [v.encode() for v in keys]
    hits = int(any(v in err.encode() for v in values))
    for path in out.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError):
                data = path.read_bytes()
                hits += any(v in data for v in values)
    return hits


def sliding_max(stamps: list[float], width: float, start: float = float("-inf")) -> int:
    """The most ``stamps`` (sorted) inside any ``width``-second window that opens at or after
    ``start`` and closes by the last stamp (the first window always counts: a run shorter
    than ``width`` is one window)."""
    stamps = [t for t in stamps if t >= start]
    best, j = 0, 0
    for i, t in enumerate(stamps):
        if i and t + width > stamps[-1] + 1e-9:
            break  # this window would close after the run: it counts less than a full one
        while j < len(stamps) and stamps[j] < t + width:
            j += 1
        best = max(best, j - i)
    return best


def cached_share(rows: list[dict[str, Any]]) -> float:
    """Cached prompt tokens over prompt tokens of the answered calls."""
    ok = [r for r in rows if r.get("status") == 200]
    prompt = sum(r.get("prompt_tokens", 0) for r in ok)
    return round(sum(r.get("cached_tokens", 0) for r in ok) / max(1, prompt), 4)


def write_problems(path: Path, problems: int, salt: str) -> Path:
    """``VARIANTS`` prompts per problem, adjacent, sharing a ~``PREFIX_TOKENS`` first message
    (``salt`` in it: a run never meets a prefix an earlier run left in the simulator's caches)."""
    with open(path, "wb") as f:
        for p in range(problems):
            words = " ".join(f"w{p}x{i}" for i in range(PREFIX_TOKENS * 4 // 8))
            first = f"Problem {p} ({salt}). Read the passage, then answer the question about it.\n{words}"
            for v in range(VARIANTS):
                messages = [
                    {"role": "system", "content": first[: PREFIX_TOKENS * 4]},
                    {"role": "user", "content": f"Question {v}: what is word {v * 7} of the passage?"},
                ]
                f.write(orjson.dumps({"id": f"p{p}-v{v}", "messages": messages}) + b"\n")
    return path


def _say(text: str) -> None:
    print(f"bench keys: {text}", file=sys.stderr, flush=True)


def load_pool() -> tuple[str, str, Pool]:
    """The `keys` profile's text, the model to ask for (its default model, or its first) and
    its keys, each read from ``FAIR_BENCH_KEY_<LABEL>``."""
    from fairdistill.engine.sim.profiles import PROFILE_DIR

    path = PROFILE_DIR / "keys.toml"
    if not path.is_file():
        raise UsageError(f"bench keys: the simulator has no `keys` profile ({path})")
    text = path.read_text()
    data = tomllib.loads(text)
    model = data.get("default_model") or next(iter(data.get("models", {"sim": 0})))
    keys = tuple(
        SimKey(label, f"FAIR_BENCH_KEY_{label.upper()}", k.get("group"), k["value"], float(k.get("rpm") or 0))
        for label, k in data.get("keys", {}).items()
    )
    groups = {name: float(g["rpm"]) for name, g in data.get("groups", {}).items() if g.get("rpm")}
    if REVOKED not in {k.label for k in keys}:
        raise UsageError(f"bench keys: {path} has no key {REVOKED!r} to revoke")
    return text, model, Pool(keys, groups)


# -- the arms ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = sizes(args.quick)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := sorted(set(arms) - set(ARMS)):
        raise UsageError(f"bench keys: --arms: unknown arm {unknown[0]!r} (have {', '.join(ARMS)})")
    work = Path(tempfile.mkdtemp(prefix="fair-bench-keys-"))
    result: dict[str, Any] = {"sizes": s, "targets": TARGETS, "achievable_rpm": ACHIEVABLE_RPM}
    text, model, pool = load_pool()
    result["achievable_rpm_of_profile"] = pool.achievable_rpm()
    try:
        with simulator(work, text) as base:
            bench = Bench(work, base, model, pool, s, keep=args.keep)
            for name in arms:
                result[name] = ARM_RUNS[name](bench)
            result["key_values_in_output"] = bench.leaks
    finally:
        if args.keep:
            result["work"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    flat = result.get("throughput", {})
    for k in ("throughput_rpm", "ratio", "share_429"):
        if k in flat:
            result[k] = flat[k]
    result["verdicts"] = _verdicts(result)
    clean = result.get("key_values_in_output", 0) == 0
    result["exit_code"] = 0 if all(result["verdicts"].values()) and clean else 1
    return result


def _throughput(bench: Bench) -> dict[str, Any]:
    inp = write_input(bench.work / "throughput.jsonl", bench.lines(bench.s["secs"]))
    arm = bench.generate("throughput", inp)
    arm.check("throughput")
    out = _rates(bench, arm)
    bench.done(arm)
    return out


def _rates(bench: Bench, arm: Arm) -> dict[str, Any]:
    """Sustained answered rpm after the warm-up and the 429 share (the simulator's counters),
    and per key the calls answered and the rpm after the warm-up (the trace's ``key``)."""
    ok = sorted((r for r in arm.trace if r.get("status") == 200), key=lambda r: r["ts"])
    backlogged = int(len(ok) * BACKLOGGED)  # after these the queues empty: the rate is the drain's
    rate, share = sustained([s for s in arm.timeline if s[2] <= backlogged], bench.s["warmup_s"])
    start = (ok[0]["ts"] if ok else 0.0) + bench.s["warmup_s"]
    end = ok[backlogged - 1]["ts"] if backlogged else start
    span = max(1e-9, end - start)
    late = [r for r in ok if start <= r["ts"] <= end]
    rpm = rate * 60
    return {
        "lines": arm.manifest().get("ok", 0) + arm.manifest().get("failed", 0),
        "throughput_rpm": round(rpm, 1),
        "achievable_rpm": ACHIEVABLE_RPM,
        "ratio": round(rpm / ACHIEVABLE_RPM, 3),
        "share_429": round(share, 4),
        "ok_per_key": _count_keys(ok),
        "rpm_per_key_after_warmup": {k: round(n / span * 60) for k, n in _count_keys(late).items()},
    }


def _revoke(bench: Bench) -> dict[str, Any]:
    n = bench.lines(bench.s["secs"])
    inp = write_input(bench.work / "revoke.jsonl", n)
    revoked: list[float] = []

    def watch(timeline: list) -> bool:
        if not timeline or timeline[-1][2] < REVOKE_AT * n:
            return False
        _http(f"{bench.sim}/sim/keys/{REVOKED}/revoke", "POST")
        revoked.append(time.time())
        return True

    arm = bench.generate("revoke", inp, watch=watch)
    arm.check("revoke", ok=(0, 1))
    m = arm.manifest()
    env_b = bench.pool.env(REVOKED)
    after = [r for r in arm.trace if revoked and r.get("ts", 0) > revoked[0] + GRACE_S]
    out = {
        "lines": n,
        "revoked_key": env_b,
        "exit_code": arm.code,
        "ok": m.get("ok", 0),
        "failed": m.get("failed", 0),
        "revoked_after_ok": round(REVOKE_AT * n),
        "calls_after_revocation": len(after),
        "after_revocation_per_key": _count_keys(after),
        "after_revocation_on_b": sum(1 for r in after if r.get("key") == env_b and r.get("status") == 200),
        "retired_line": any(env_b in line and "retir" in line.lower() for line in arm.err.splitlines()),
    }
    bench.done(arm)
    return out


def _count_keys(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("key") or "-"] = counts.get(r.get("key") or "-", 0) + 1
    return dict(sorted(counts.items()))


def _ray(bench: Bench) -> dict[str, Any]:
    n = bench.lines(bench.s["ray_secs"])
    inp = write_input(bench.work / "ray.jsonl", n)
    arm = bench.generate("ray", inp, "--ray", "--workers", "2", "--block-size", str(max(50, n // 8)))
    arm.check("ray")
    out = _rates(bench, arm)
    out.update(adherence(arm.trace, bench.pool, bench.s))
    bench.done(arm)
    return out


def adherence(rows: list[dict[str, Any]], pool: Pool, s: dict[str, Any]) -> dict[str, Any]:
    """The most calls answered 200 in a sliding window, per key and per group with a hidden
    limit, over that limit in the same window. Windows open after the warm-up in ``--quick``
    (10 s windows would count the buckets' first burst), anywhere in the full run."""
    ok = [r for r in rows if r.get("status") == 200]
    if not ok:
        return {"adherence": {}, "adherence_max": None}
    width = s["window_s"]
    start = ok[0]["ts"] + (s["warmup_s"] if width < 60 else 0.0)
    per: dict[str, float] = {}
    for k in pool.keys:
        stamps = [r["ts"] for r in ok if r.get("key") == k.env]
        per[k.label] = sliding_max(stamps, width, start) / (k.rpm * width / 60) if stamps else 0.0
    for group, rpm in pool.groups.items():
        envs = {k.env for k in pool.keys if k.group == group}
        stamps = [r["ts"] for r in ok if r.get("key") in envs]
        per[group] = sliding_max(stamps, width, start) / (rpm * width / 60) if stamps else 0.0
    return {
        "window_s": width,
        "windows_from_s": round(start - ok[0]["ts"], 1),
        "run_s": round(ok[-1]["ts"] - ok[0]["ts"], 1),
        "adherence": {k: round(v, 3) for k, v in per.items()},
        "adherence_max": round(max(per.values()), 3),
    }


def _affinity(bench: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {"problems": bench.s["problems"], "prompts_per_problem": VARIANTS}
    for name, extra in (("on", ()), ("off", ("--no-key-affinity",))):
        inp = write_problems(bench.work / f"affinity-{name}.jsonl", bench.s["problems"], name)
        arm = bench.generate(f"affinity-{name}", inp, *extra)
        arm.check(f"affinity {name}")
        out[f"cached_share_{name}"] = cached_share(arm.trace)
        out[f"cached_tokens_per_key_{name}"] = _cached_per_key(arm.trace)
        bench.done(arm)
    out["gain"] = round(out["cached_share_on"] - out["cached_share_off"], 4)
    return out


def _cached_per_key(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        key = r.get("key") or "-"
        counts[key] = counts.get(key, 0) + int(r.get("cached_tokens", 0))
    return dict(sorted(counts.items()))


ARM_RUNS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "throughput": _throughput,
    "revoke": _revoke,
    "ray": _ray,
    "affinity": _affinity,
}


def _verdicts(r: dict[str, Any]) -> dict[str, bool]:
    v: dict[str, bool] = {}
    if t := r.get("throughput"):
        v["throughput"] = t["ratio"] >= TARGETS["throughput_ratio_min"]
        v["share_429"] = t["share_429"] < TARGETS["share_429_max"]
    if k := r.get("revoke"):
        v["revoke_no_failures"] = k["exit_code"] == 0 and k["failed"] == 0 and k["ok"] == k["lines"]
        per_key = k["after_revocation_per_key"]  # "-": a trace line without its key
        others = k["revoked_key"] not in per_key and "-" not in per_key
        v["revoke_rest_on_others"] = (
            k["calls_after_revocation"] > 0 and k["after_revocation_on_b"] == 0 and others
        )
    if (a := r.get("ray")) is not None:
        m = a.get("adherence_max")
        v["ray_adherence"] = m is not None and m <= TARGETS["ray_adherence_max"]
    if f := r.get("affinity"):
        v["affinity_cache_gain"] = f["gain"] >= TARGETS["affinity_gain_min"]
    return v


def table(r: dict[str, Any]) -> str:
    lines = ["fair bench keys" + (" (quick)" if r.get("quick") else ""), ""]
    if t := r.get("throughput"):
        lines.append(
            f"throughput: {t['throughput_rpm']:,.0f} rpm of {ACHIEVABLE_RPM:,} ({t['ratio']}x, >= 0.95), "
            f"429s {t['share_429'] * 100:.2f} % (< 2 %); per key {t['ok_per_key']}"
        )
    if k := r.get("revoke"):
        lines.append(
            f"revoke b at {REVOKE_AT:.0%}: exit {k['exit_code']}, {k['ok']} ok / {k['failed']} failed of "
            f"{k['lines']}; after it {k['after_revocation_per_key']} (on b: {k['after_revocation_on_b']})"
        )
    if a := r.get("ray"):
        lines.append(
            f"ray 2 workers: {a['throughput_rpm']:,.0f} rpm ({a['ratio']}x), "
            f"429s {a['share_429'] * 100:.2f} %; "
            f"adherence over {a.get('window_s')} s windows {a.get('adherence')} (<= 1.02)"
        )
    if f := r.get("affinity"):
        lines.append(
            f"affinity: cached share on {f['cached_share_on']} vs off {f['cached_share_off']} "
            f"(gain {f['gain']}, >= 0.1)"
        )
    lines.append(f"key values in output: {r.get('key_values_in_output', '-')}")
    lines.append(f"verdicts: {r.get('verdicts')}")
    return "\n".join(lines)
