"""Key pools under `--ray` (issue 23): the pool lives in the limiter actor, shared by every worker.

The limiter's protocol is tested on its plain class (``LimiterState``) without a cluster; the
runs are the real `fair generate --ray local --workers 2` in a child process against the
simulator (``engine.sim``, keys from its profile) over loopback. Ray's session files go to a
temporary directory of the test (``RAY_TMPDIR``), so that what Ray wrote can be searched for the
keys' values, along with the run directory and the command's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from fakeserver import records, write_input

from fairdistill.engine.config import EndpointConfig, KeyConfig
from fairdistill.engine.errors import AuthError
from fairdistill.engine.sim.profiles import KeyProfile, ModelProfile, SimProfile
from fairdistill.engine.sim.server import SimThread

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ENVS = ("FAIR_RAY_KEY_A", "FAIR_RAY_KEY_B", "FAIR_RAY_KEY_C")
VALUES = {env: f"sk-raypool-{env[-1].lower()}-5f0c2e7a9b" for env in ENVS}  # what the sim accepts
LABELS = {env: env[-1].lower() for env in ENVS}  # the sim's label of each key


def pool_config(n: int = 3, keys: list[KeyConfig] | None = None, **extra: object) -> EndpointConfig:
    keys = keys if keys is not None else [KeyConfig(env=env) for env in ENVS[:n]]
    return EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", concurrency=8, keys=keys, **extra)


# -- the limiter's protocol, without a cluster ------------------------------------------------------


def test_limiter_builds_the_pool_from_a_config_without_headers_or_keys() -> None:
    """What the driver sends the limiter for a pool: the config less its headers (names only)."""
    from fairdistill.engine.request.keypool import KeyPool
    from fairdistill.engine.scale.limiter import LimiterState, limiter_spec

    cfg = pool_config(headers={"X-Team": "t-123"})
    spec = limiter_spec(cfg, "gpt")
    assert isinstance(spec, EndpointConfig) and spec.headers == {} and spec.name == "gpt"
    assert [k.env for k in spec.keys] == list(ENVS)
    assert not any(v.encode() in msgspec.json.encode(spec) for v in VALUES.values())
    plain = limiter_spec(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", rpm=60), "one")
    assert plain == (64, 60, None)
    lim = LimiterState({"gpt": spec, "one": plain})
    assert isinstance(lim.admissions["gpt"], KeyPool) and len(lim.admissions["gpt"].keys) == 3


def test_the_pool_buckets_start_empty_at_the_first_ask() -> None:
    """Each key's, each group's and the endpoint's configured buckets are emptied at the first
    ask, as one endpoint's are (``start_empty``): the refill since the limiter was built must not
    go at once, on top of the steady rate, from every worker together."""
    import time

    from fairdistill.engine.config import GroupConfig
    from fairdistill.engine.scale.limiter import LimiterState, limiter_spec, start_empty

    keys = [KeyConfig(env=ENVS[0], group="org", rpm=600), KeyConfig(env=ENVS[1], group="org")]
    cfg = pool_config(keys=keys, rpm=6000, groups={"org": GroupConfig(rpm=600)})
    pool = LimiterState({"gpt": limiter_spec(cfg, "gpt")}).admissions["gpt"]
    buckets = [pool.keys[0].admission.requests] + [g.requests for g in pool._gates.values()]
    assert len(buckets) == 3
    for bucket in buckets:
        bucket.updated -= 30  # built 30 s before the first request
    start_empty(pool)
    now = time.monotonic()
    assert all(b.reserve(1.0, now) > 0.005 for b in buckets)  # each waits for its refill


def test_grants_name_their_key_and_every_key_serves() -> None:
    """Acquires carry an affinity; each grant names the key its lease is for, and the pool spreads
    unknown keys evenly; ``admission_state`` counts per key (the bench reads it)."""
    from fairdistill.engine.scale.limiter import LimiterState, limiter_spec

    async def scenario() -> None:
        lim = LimiterState({"gpt": limiter_spec(pool_config(), "gpt")})
        granted, _, lend = await lim.acquire("w0", "gpt", [(i, 10.0, i + 1) for i in range(6)])
        assert lend == 0.0  # a pool is never lent
        assert sorted(g.req for g in granted) == list(range(6))
        assert {g.key for g in granted} == {0, 1, 2} and all(g.error is None for g in granted)
        state = lim.admission_state()["gpt"]
        assert state["leases"] == 6
        assert {env: k["granted"] for env, k in state["keys"].items()} == dict.fromkeys(ENVS, 2)
        lim.release([(g.lease, 200, None, 20.0) for g in granted])
        assert lim.admission_state()["gpt"]["leases"] == 0

    asyncio.run(scenario())


def test_a_retired_key_is_said_once_then_no_key_left_refuses_with_the_variables() -> None:
    """Two workers report the same refused key: one line for the driver; that key is never granted
    again; once every key is retired, waiting and new acquires come back refused, naming them."""
    from fairdistill.engine.scale.limiter import LimiterState, limiter_spec

    async def scenario() -> None:
        lim = LimiterState({"gpt": limiter_spec(pool_config(2), "gpt")})
        granted, _, _ = await lim.acquire("w0", "gpt", [(0, 1.0), (1, 1.0)])
        on_a = next(g for g in granted if g.key == 0)
        lim.retire("gpt", on_a.lease, 0)
        lim.retire("gpt", -1, 0)  # another worker, its lease already given back
        news = lim.take_news()
        assert news == ["fair: endpoint 'gpt': key FAIR_RAY_KEY_A was refused (401/403); "
                        "retired for this run, 1 of 2 keys left"]  # fmt: skip
        assert lim.take_news() == []
        lim.release([(g.lease, 401 if g.key == 0 else 200, None, None) for g in granted])
        granted, _, _ = await lim.acquire("w1", "gpt", [(0, 1.0, 7), (1, 1.0, 8)])
        assert {g.key for g in granted} == {1}
        lim.retire("gpt", granted[0].lease, 1)
        assert "0 of 2 keys left" in lim.take_news()[0]
        refused, _, _ = await lim.acquire("w1", "gpt", [(2, 1.0)])
        assert [g.lease for g in refused] == [-1]
        assert "FAIR_RAY_KEY_A" in refused[0].error and "FAIR_RAY_KEY_B" in refused[0].error

    asyncio.run(scenario())


def test_the_proxy_reports_a_refused_key_once_and_raises_when_none_is_left() -> None:
    """``AdmissionProxy`` against a stand-in of the actor handle: ``key_of`` is the grant's key,
    ``retire`` tells the limiter once per key and never says ``newly`` (the driver does), and a
    refused grant raises ``AuthError`` in the caller."""
    from fairdistill.engine.scale.limiter import AdmissionProxy, LimiterState, limiter_spec

    class Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            out = self.fn(*args)
            if asyncio.iscoroutine(out):
                return asyncio.ensure_future(out)
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(out)
            return fut

    class Handle:
        def __init__(self, state: LimiterState):
            self.calls: list[str] = []
            for name in ("acquire", "release", "retire"):
                setattr(self, name, Method(self._log(name, getattr(state, name))))

        def _log(self, name, fn):
            def call(*args):
                self.calls.append(name)
                return fn(*args)

            return call

    async def scenario() -> None:
        state = LimiterState({"gpt": limiter_spec(pool_config(2), "gpt")})
        handle = Handle(state)
        proxy = AdmissionProxy(handle, "w0", "gpt", keys=2)
        leases = [await proxy.acquire(1.0, affinity=a) for a in (1, 2)]
        by_key = {proxy.key_of(lease): lease for lease in leases}
        assert set(by_key) == {0, 1}
        assert proxy.retire(by_key[0]) == (False, 1)
        assert proxy.retire(by_key[0]) == (False, 1)  # told once
        assert handle.calls.count("retire") == 1
        await asyncio.sleep(0)
        assert not state.admissions["gpt"].keys[0].live
        assert proxy.retire(by_key[1]) == (False, 0)
        for lease in leases:
            proxy.release(lease, 401)
        await asyncio.sleep(0.05)
        with pytest.raises(AuthError, match="FAIR_RAY_KEY_A, FAIR_RAY_KEY_B"):
            await asyncio.wait_for(proxy.acquire(1.0, affinity=3), 5)

    asyncio.run(scenario())


# -- `fair generate --ray local --workers 2` against the simulator -----------------------------------


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """Ray's session files for one run (short: Ray's socket paths must fit 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="frk", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sim_profile(revoke_after: dict[str, int] | None = None) -> SimProfile:
    """Three keys, each its own organisation; ``revoke_after``: label -> requests it serves."""
    revoke_after = revoke_after or {}
    keys = {LABELS[env]: KeyProfile(value=VALUES[env], revoke_after_requests=revoke_after.get(LABELS[env]))
            for env in ENVS}  # fmt: skip
    return SimProfile(models={"m": ModelProfile(latency_ms=5)}, keys=keys)


def child_env(ray_tmp: Path) -> dict[str, str]:
    """The keys in the child's environment (the workers of `--ray local` inherit it), Ray's
    session files under ``ray_tmp``, and a new local cluster whatever RAY_ADDRESS says."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | VALUES | {"RAY_TMPDIR": str(ray_tmp)}


def fair_child(args: list[str], ray_tmp: Path) -> tuple[int, str]:
    """`fair ARGS` in a child (own process group, killed with it): (exit code, stdout + stderr)."""
    proc = subprocess.Popen(
        [PY, "-m", "fairdistill", *args], cwd=REPO, env=child_env(ray_tmp), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, (stdout + stderr).decode()


def run_pool(sim: SimThread, tmp_path: Path, ray_tmp: Path, n: int = 300) -> tuple[int, str, Path]:
    """`fair generate --ray local --workers 2 --key A --key B --key C` over ``n`` lines:
    (exit code, stdout + stderr, run dir)."""
    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out"
    args = ["generate", "--endpoint", sim.base_url, "--model", "m", "--input", str(inp), "--output", str(out),
            "--no-progress", "--ray", "local", "--workers", "2", "--block-size", "100"]  # fmt: skip
    for env in ENVS:
        args += ["--key", env]
    code, output = fair_child(args, ray_tmp)
    return code, output, out


def assert_no_key_value(output: str, *roots: Path) -> None:
    """No key value in the command's output, the run directory, or Ray's session files (its
    logs, the workers' and the limiter's output: what Ray carried and kept)."""
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any("session_" in str(p) for p in files)  # Ray's session did write where we look
    for value in VALUES.values():
        assert value not in output
        for path in files:
            with contextlib.suppress(OSError):
                assert value.encode() not in path.read_bytes(), path


def test_every_key_of_the_pool_serves_both_workers(tmp_path: Path, ray_tmp: Path) -> None:
    with SimThread(sim_profile()) as sim:
        code, output, out = run_pool(sim, tmp_path, ray_tmp)
        by_key = {label: dict(c) for label, c in sim.stats.by_key.items()}
    assert code == 0, output
    rows = records(out)
    assert len(rows) == 300 and all(r["error"] is None for r in rows.values())
    assert all(by_key[label]["ok"] > 30 for label in LABELS.values()), by_key  # spread, not one key
    assert sum(c["ok"] for c in by_key.values()) == 300  # nothing sent twice
    assert_no_key_value(output, out, ray_tmp)


def test_a_key_revoked_mid_run_is_retired_once_and_no_record_fails(tmp_path: Path, ray_tmp: Path) -> None:
    """Key b is refused (401) after its 30th request: the limiter's pool retires it for both
    workers, the driver says so once naming the variable, and its calls go again on a and c."""
    with SimThread(sim_profile({"b": 30})) as sim:
        code, output, out = run_pool(sim, tmp_path, ray_tmp)
        by_key = {label: dict(c) for label, c in sim.stats.by_key.items()}
    assert code == 0, output
    rows = records(out)
    assert len(rows) == 300 and all(r["error"] is None for r in rows.values())
    assert by_key["b"]["ok"] == 30 and by_key["b"]["http_401"] >= 1, by_key
    assert sum(c["ok"] for c in by_key.values()) == 300  # every refused call answered once, elsewhere
    said = [line for line in output.splitlines() if "FAIR_RAY_KEY_B was refused" in line]
    assert len(said) == 1 and "retired for this run, 2 of 3 keys left" in said[0], output
    assert "FAIR_RAY_KEY_A was refused" not in output and "FAIR_RAY_KEY_C was refused" not in output
    assert_no_key_value(output, out, ray_tmp)


def test_every_key_revoked_aborts_the_run_exit_3_naming_the_variables(tmp_path: Path, ray_tmp: Path) -> None:
    with SimThread(sim_profile(dict.fromkeys(LABELS.values(), 5))) as sim:
        code, output, out = run_pool(sim, tmp_path, ray_tmp)
    assert code == 3, output
    assert "aborted" in output and all(env in output.rsplit("aborted", 1)[1] for env in ENVS), output
    for env in ENVS:  # each retirement said once
        assert sum(f"key {env} was refused" in line for line in output.splitlines()) == 1, output
    assert len(records(out)) < 300
    assert_no_key_value(output, out, ray_tmp)


def test_fair_run_on_ray_with_pooled_endpoints_survives_a_revoked_key(tmp_path: Path, ray_tmp: Path) -> None:
    """`fair run --ray local`: every endpoint of the job has the pool (one limiter, a pool per
    endpoint, stages passing the problem as affinity); key b dies mid-run: the run is done, each
    endpoint says at most once that it retired b, and no key value is written anywhere."""
    import re

    from test_pipeline import _write_job, problems, profile

    probs = problems(20)
    keys = {LABELS[env]: KeyProfile(value=VALUES[env], revoke_after_requests=40 if env == ENVS[1] else None)
            for env in ENVS}  # fmt: skip
    with SimThread(msgspec.structs.replace(profile(latency_ms=5), keys=keys), probs) as sim:
        job = _write_job(tmp_path, sim.base_url, probs)
        pool = "keys = [" + ", ".join(f'{{ env = "{env}" }}' for env in ENVS) + "]\n"
        job.write_text(re.sub(r'(model = "[^"]+"\n)', lambda m: m[1] + pool, job.read_text()))
        out = tmp_path / "ray"
        args = ["run", str(job), "--run-dir", str(out), "--no-progress", "--ray", "local", "--workers", "2",
                "--block-size", "5"]  # fmt: skip
        code, output = fair_child(args, ray_tmp)
        by_key = {label: dict(c) for label, c in sim.stats.by_key.items()}
    assert code == 0, output
    assert by_key["b"]["http_401"] >= 1 and all(by_key[k]["ok"] > 0 for k in ("a", "c")), by_key
    said = re.findall(r"endpoint '([\w-]+)': key FAIR_RAY_KEY_B was refused", output)
    assert said and len(said) == len(set(said)), output
    manifest = msgspec.json.decode((out / "manifest.json").read_bytes())
    assert manifest["status"] == "done" and manifest["problems_total"] == 20
    assert_no_key_value(output, out, ray_tmp)
