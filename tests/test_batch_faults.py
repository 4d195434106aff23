"""Batch APIs against a hostile provider: the real ``fair`` command talks to a proxy in front of
the simulator that passes every call through and rewrites the replies a test picks (an HTML
page for a create, a batch that 404s on every poll, a garbage result line, an absurd count, a
500 on cancel, ESC bytes). Asserted at the provider: how many batches were made and billed."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakeserver import fair, records, write_input

from fairdistill.engine.request.batch.executor import DOWNLOAD_TRIES
from fairdistill.engine.rundir.store import read_manifest
from fairdistill.engine.sim.server import SimServer

PROVIDERS = ["openai", "anthropic", "gemini"]
ROUTES = {  # "METHOD path" of each kind of batch call, on the three wires
    "create": r"POST (/v1/batches|/v1/messages/batches|/v1beta/models/[^/]+:batchGenerateContent)",
    "list": r"GET (/v1/batches|/v1/messages/batches|/v1beta/batches)",
    "retrieve": r"GET (/v1/batches|/v1/messages/batches|/v1beta/batches)/[^/:]+",
    "results": r"GET (/v1/files/[^/]+/content|/v1/messages/batches/[^/]+/results|/download/v1beta/files/.+)",
    "cancel": r"POST (/v1(/messages)?/batches/[^/]+/cancel|/v1beta/batches/[^/]+:cancel)",
}
# (route, status, body, nth call of that route) -> a replacement (status, body), or None: as is
Rule = Callable[[str, int, bytes, int], tuple[int, bytes] | None]
EMPTY_LIST = b'{"object":"list","data":[],"has_more":false,"operations":[]}'


class Hostile:
    """A loopback proxy in front of ``sim`` whose ``rule`` may rewrite any reply; ``hits`` counts
    the calls per route; a route in ``blocked`` never reaches the simulator (the rule answers)."""

    def __init__(self, sim: SimServer, rule: Rule | None = None):
        self.sim, self.rule, self.hits = sim, rule, Counter()
        self.blocked: set[str] = set()

    async def __aenter__(self) -> Hostile:
        app = web.Application(client_max_size=1 << 26)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        self._http = aiohttp.ClientSession()
        self.url = f"http://127.0.0.1:{self._server.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.close()
        await self._server.close()

    def base(self, provider: str) -> str:
        return self.url + ("/v1beta" if provider == "gemini" else "/v1")

    async def _forward(self, req: web.Request) -> web.Response:
        route = next((k for k, rx in ROUTES.items() if re.fullmatch(rx, f"{req.method} {req.path}")), "")
        self.hits[route] += 1
        status, body, upload = 502, b"", None
        if route not in self.blocked:
            skip = {"host", "content-length", "transfer-encoding"}
            headers = {k: v for k, v in req.headers.items() if k.lower() not in skip}
            async with self._http.request(
                req.method, self.sim.url + req.path_qs, data=await req.read(), headers=headers
            ) as r:
                status, body, upload = r.status, await r.read(), r.headers.get("X-Goog-Upload-URL")
        changed = self.rule(route, status, body, self.hits[route]) if self.rule and route else None
        status, body = changed or (status, body)
        out = {"X-Goog-Upload-URL": upload.replace(self.sim.url, self.url)} if upload else {}
        return web.Response(status=status, body=body, headers=out, content_type="application/json")


async def run(*args: str, limit_s: float = 60.0) -> tuple[int, str, str]:
    """``fair ARGS`` as a child, SIGKILLed (rc -9) when it outlives ``limit_s``: a hang fails fast."""
    end = time.monotonic() + limit_s
    return await fair(*args, kill_when=lambda: time.monotonic() > end)


def gen(proxy: Hostile, provider: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--endpoint", proxy.base(provider), "--model", "sim", "--provider", provider,
            "--input", str(inp), "--output", str(out), "--no-progress", "--max-tokens", "50",
            "--mode", "batch", "--batch-linger", "0.05", "--batch-poll", "0.05", *extra]  # fmt: skip


def events(out: Path) -> list[dict]:
    return [orjson.loads(x) for x in (out / "batches" / "journal.jsonl").read_bytes().splitlines()]


def edit(body: bytes, change: Callable[[dict], None]) -> bytes:
    obj = orjson.loads(body)
    change(obj)
    return orjson.dumps(obj)


def ok(out: Path, n: int) -> None:
    got = records(out)
    assert len(got) == n and not [r for r in got.values() if r["error"]]


# -- 1. an unreadable 200 reply to a create is a lost reply: looked up, never created again ------

UNREADABLE_CREATES = {
    "html": lambda body: b"<html><body><h1>Welcome</h1></body></html>",
    "no id": lambda body: edit(body, lambda o: o.pop("id", None) or o.pop("name", None)),
    "dot-dot id": lambda body: edit(body, lambda o: o.update({"id": "../../files"} if "id" in o else {})),
    "gemini dot-dot name": lambda body: edit(body, lambda o: o.update(name="batches/../..")),
}


@pytest.mark.parametrize(
    ("provider", "reply"),
    [("openai", "html"), ("openai", "dot-dot id"), ("anthropic", "no id"), ("gemini", "gemini dot-dot name")],
)
async def test_an_unreadable_create_reply_is_found_at_the_provider_not_created_again(
    tmp_path, provider, reply
):
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out"
    mangle = UNREADABLE_CREATES[reply]

    def rule(route: str, status: int, body: bytes, nth: int) -> tuple[int, bytes] | None:
        return (200, mangle(body)) if route == "create" else None

    async with SimServer("default") as sim, Hostile(sim, rule) as proxy:
        rc, _, err = await run(*gen(proxy, provider, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1 and proxy.hits["create"] == 1
        assert sim.stats["batch_items_billed"] == 6
    ok(out, 6)
    assert read_manifest(out)["generate"]["batch"]["creates_recovered"] == 1


@pytest.mark.parametrize("provider", ["openai", "gemini"])
async def test_an_unreadable_create_the_provider_does_not_list_stops_and_is_never_made_again(
    tmp_path, provider
):
    inp, out = write_input(tmp_path / "in.jsonl", 5), tmp_path / "out"
    mangle, hide = True, True

    def rule(route: str, status: int, body: bytes, nth: int) -> tuple[int, bytes] | None:
        if route == "create" and mangle:
            return 200, b"<html>ok</html>"
        return (200, EMPTY_LIST) if route == "list" and hide else None

    async with SimServer("default") as sim, Hostile(sim, rule) as proxy:
        for _ in range(2):  # the run stops; a rerun that still cannot find it stops again
            rc, _, err = await run(*gen(proxy, provider, inp, out))
            assert rc == 1 and sim.stats["batches_created"] == 1, err
            assert len(err.strip().splitlines()) == 1 and "fair batches attach" in err
        (batch,) = sim.batch.batches.values()
        last = events(out)[-1]
        assert last["ev"] == "creating" and last["status"] == "unreadable_reply"
        local = last["local"]
        if provider == "openai":  # a person finds it and attaches it: collected, paid once
            rc, _, err = await run("batches", "attach", str(out), local, batch.id)
            assert rc == 0, err
        else:  # or decides it does not exist: forgotten, the rerun makes a new one
            rc, said, err = await run("batches", "cancel", str(out), local)
            assert rc == 0 and f"forgot {local}" in said, err
        mangle, hide = False, provider == "gemini"  # gemini: still not listed: a new batch
        rc, _, err = await run(*gen(proxy, provider, inp, out))
        assert rc == 0, err
        made = 1 if provider == "openai" else 2
        assert sim.stats["batches_created"] == made and sim.stats["batch_items_billed"] == 5 * made
    ok(out, 5)


# -- 2. a batch that cannot be followed stops the run, naming it: never a silent endless poll -----

BAD_POLLS = {
    "404": lambda body: (404, b'{"error": {"message": "No batch found with that id"}}'),
    "status 7": lambda body: (
        200,
        edit(body, lambda o: o.update(status=7, processing_status=7, metadata={"state": 7})),
    ),
}


@pytest.mark.parametrize(
    ("provider", "poll"),
    [("openai", "404"), ("openai", "status 7"), ("anthropic", "status 7"), ("gemini", "404")],
)
async def test_polls_that_keep_failing_stop_with_one_line_naming_the_batch_exit_1(tmp_path, provider, poll):
    inp, out = write_input(tmp_path / "in.jsonl", 4), tmp_path / "out"
    bad = BAD_POLLS[poll]

    def rule(route: str, status: int, body: bytes, nth: int) -> tuple[int, bytes] | None:
        return bad(body) if route == "retrieve" else None

    async with SimServer("default") as sim, Hostile(sim, rule) as proxy:
        rc, _, err = await run(*gen(proxy, provider, inp, out, "--batch-max-poll-failures", "3"))
        assert sim.stats["batches_created"] == 1 and proxy.hits["retrieve"] == 3
    (bid,) = {e["id"] for e in events(out) if e.get("id")}
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert bid in err and "3 status polls in a row failed" in err and f"fair batches cancel {out}" in err
    assert events(out)[-1]["ev"] == "submitted"  # still known: a rerun re-attaches, cancel reaches it


async def test_a_batch_past_its_deadline_and_one_the_provider_forgot_stop_the_run_naming_it(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 4), tmp_path / "out"
    async with SimServer("default") as sim, Hostile(sim) as proxy:
        sim.batch.faults = msgspec.convert({"start_s": 30}, type(sim.batch.faults))
        rc, _, err = await run(*gen(proxy, "anthropic", inp, out, "--batch-deadline", "0.4"))
        (bid,) = sim.batch.batches
        assert rc == 1 and bid in err and "batch.deadline_s = 0.4 s" in err, err
        assert len(err.strip().splitlines()) == 1
        # the rerun meets a provider that no longer knows the journal's batch (404 on every poll)
        async with SimServer("default") as forgetful:
            proxy.sim = forgetful
            rc, _, err = await run(*gen(proxy, "anthropic", inp, out, "--batch-max-poll-failures", "2"))
            assert rc == 1 and bid in err and "2 status polls in a row failed" in err and "404" in err, err
            assert forgetful.stats["batches_created"] == 0 and len(err.strip().splitlines()) == 1


# -- 3. readable results are used: one garbage line or an absurd count loses nothing else --------


def garbage_second_line(route: str, status: int, body: bytes, nth: int) -> tuple[int, bytes] | None:
    if route != "results" or status != 200 or body.count(b"\n") < 2:
        return None
    lines = body.split(b"\n")
    lines[1] = b'{"custom_id": \x00 garbage'
    return status, b"\n".join(lines)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_garbage_result_line_costs_only_its_own_item_a_second_round(tmp_path, provider):
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out"
    async with SimServer("default") as sim, Hostile(sim, garbage_second_line) as proxy:
        rc, _, err = await run(*gen(proxy, provider, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 2 and sim.stats["batch_items"] == 7  # 6, then the lost one
    ok(out, 6)
    assert "1 unreadable result line(s) (line 2)" in err
    assert read_manifest(out)["generate"]["batch"]["result_lines_unreadable"] == 1


async def test_with_no_round_left_the_item_of_a_garbage_line_fails_alone(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out"
    async with SimServer("default") as sim, Hostile(sim, garbage_second_line) as proxy:
        rc, _, err = await run(*gen(proxy, "openai", inp, out, "--batch-max-rounds", "1"))
        assert sim.stats["batches_created"] == 1
    got = records(out)
    failed = [r for r in got.values() if r["error"]]
    assert rc == 1 and len(got) == 6 and len(failed) == 1, err
    assert "max_rounds = 1" in failed[0]["error"]


def appended_garbage(route: str, status: int, body: bytes, nth: int) -> tuple[int, bytes] | None:
    return (status, body + b"<html>oops</html>\n") if route == "results" and status == 200 and body else None


ABSURD_COUNTS = {
    "openai": lambda o: o.update(request_counts={"total": 10**12, "completed": 10**12, "failed": 0}),
    "anthropic": lambda o: o["request_counts"].update(succeeded=10**12),
    "gemini": lambda o: o["metadata"].update(batchStats={"requestCount": "1000000000000"}),
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_absurd_request_count_beside_complete_results_loses_nothing(tmp_path, provider):
    inp, out = write_input(tmp_path / "in.jsonl", 5), tmp_path / "out"

    def rule(route: str, status: int, body: bytes, nth: int) -> tuple[int, bytes] | None:
        if route == "retrieve" and status == 200:
            return status, edit(body, ABSURD_COUNTS[provider])
        return None

    async with SimServer("default") as sim, Hostile(sim, rule) as proxy:
        rc, _, err = await run(*gen(proxy, provider, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1 and proxy.hits["results"] <= 2  # read once (OpenAI: 2 files)
    ok(out, 5)


async def test_an_extra_garbage_line_after_complete_results_loses_nothing(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 5), tmp_path / "out"
    async with SimServer("default") as sim, Hostile(sim, appended_garbage) as proxy:
        rc, _, err = await run(*gen(proxy, "anthropic", inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1 and proxy.hits["results"] == DOWNLOAD_TRIES
    ok(out, 5)


# -- 4. `fair batches cancel` says when the provider did not cancel ------------------------------


@pytest.mark.parametrize("provider", ["openai", "gemini"])
async def test_batches_cancel_reports_a_refused_cancel_and_exits_non_zero(tmp_path, provider):
    inp, out = write_input(tmp_path / "in.jsonl", 4), tmp_path / "out"
    answer: tuple[int, bytes] | None = None

    def rule(route: str, status: int, body: bytes, nth: int) -> tuple[int, bytes] | None:
        return answer if route == "cancel" else None

    async with SimServer("default") as sim, Hostile(sim, rule) as proxy:
        sim.batch.faults = msgspec.convert({"start_s": 30}, type(sim.batch.faults))
        rc, _, err = await run(*gen(proxy, provider, inp, out, "--batch-deadline", "0.3"))
        assert rc == 1, err  # left running at the provider, named, in the journal
        (batch,) = sim.batch.batches.values()
        proxy.blocked.add("cancel")
        answer = (500, b'{"error": {"message": "\x1b[2J\x1b]0;pwned\x07 internal error"}}')
        rc, said, err = await run("batches", "cancel", str(out))
        assert rc == 1 and "not canceled" in err and "internal error" in err and "canceled" not in said, err
        assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err
        assert len(err.strip().splitlines()) == 1 and batch.ended is None
        answer = (401, b'{"error": {"message": "invalid x-api-key"}}')
        rc, _, err = await run("batches", "cancel", str(out))
        assert rc == 3 and "refused the credentials" in err and batch.ended is None, err
        answer = None
        proxy.blocked.clear()
        rc, said, err = await run("batches", "cancel", str(out))
        assert rc == 0 and "canceled" in said and batch.ended is not None, err


# -- 5. outside strings reach the terminal escaped ------------------------------------------------


async def test_batches_list_and_attach_print_no_raw_control_bytes(tmp_path):
    out = tmp_path / "out"
    (out / "batches").mkdir(parents=True)
    lines = [
        {"ev": "open", "local": "fb-1", "lane": "gpt\x1b]0;title\x07", "provider": "openai"},
        {"ev": "creating", "local": "fb-1", "n": 2, "ids": ["fd" + "0" * 40]},
        {"ev": "submitted", "local": "fb-1", "id": "batch_\x1b[31mred\u202e"},
        {"ev": "ended", "local": "fb-1", "status": "completed\r\x1b[2K"},
    ]
    (out / "batches" / "journal.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    rc, said, err = await run("batches", "list", str(out))
    assert rc == 0, err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", said.replace("\t", " ")), said
    assert said.count("\\x1b") == 3 and len(said.strip().splitlines()) == 1
    rc, said, err = await run("batches", "attach", str(out), "fb-1", "batch_\x1b[2Jx")
    assert rc == 2 and "not a provider batch id" in err and "\x1b" not in err + said, err
    rc, said, err = await run("batches", "cancel", str(out), "\x1b[2Jnope")
    assert rc == 2 and "no batch" in err and "\x1b" not in err + said, err


# -- 6. a flag that does not apply is refused ----------------------------------------------------


@pytest.mark.parametrize(
    "flags", [["--batch-poll", "1"], ["--batch-linger", "2", "--batch-fallback", "online"]]
)
async def test_batch_flags_without_mode_batch_are_refused_with_exit_2(tmp_path, flags):
    inp, out = write_input(tmp_path / "in.jsonl", 1), tmp_path / "out"
    args = ["generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--input", str(inp),
            "--output", str(out), "--no-progress", *flags]  # fmt: skip
    for mode in ([], ["--mode", "online"]):
        rc, _, err = await run(*args, *mode)
        assert rc == 2 and "apply only with --mode batch" in err, err
        assert all(f in err for f in flags if f.startswith("--")) and not out.exists()


async def test_a_batch_table_on_an_online_endpoint_is_refused_naming_file_and_endpoint(tmp_path):
    base = (Path(__file__).parents[1] / "examples" / "sim-gsm8k.toml").read_text()
    assert 'model = "gpt-sim"' in base
    config = tmp_path / "c.toml"
    config.write_text(base.replace('model = "gpt-sim"', 'model = "gpt-sim"\nbatch = {poll_s = 1}', 1))
    rc, _, err = await run("run", str(config), "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and str(config) in err and "endpoints.gpt-sim" in err, err
    assert 'applies only with mode = "batch"' in err and not (tmp_path / "run").exists()
