"""`fair generate` end to end: streaming input, one record per id, bad lines, exit codes,
and SIGKILL-then-resume giving exactly the uninterrupted output."""

from __future__ import annotations

import signal

import pytest
from fakeserver import FakeServer, fair, gen_args, records, write_input

import fairdistill.engine.request.client as client_mod
from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import InputError
from fairdistill.engine.generate import count_lines, generate, parse_line
from fairdistill.engine.rundir.store import read_manifest


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_BASE_S", 0.01)


async def test_generate_writes_one_record_per_id_and_a_manifest(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 50)
    async with FakeServer() as srv:
        summary = await generate(
            inp, tmp_path / "out", EndpointConfig(base_url=srv.url, model="m", concurrency=8), progress=False
        )
        assert len(srv.seen) == 50
        assert srv.seen[0].body["messages"][0] == {"role": "system", "content": "be brief"}
    got = records(tmp_path / "out")
    assert set(got) == {f"r{i}" for i in range(50)}
    assert got["r7"]["texts"] == ["echo: question 7"] and got["r7"]["error"] is None
    assert got["r8"]["finish_reasons"] == ["stop"] and got["r8"]["prompt_tokens"] > 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["status"] == "done" and manifest["counts"]["responses"] == 50
    assert manifest["generate"]["ok"] == 50 and manifest["endpoints"]["default"]["ok"] == 50
    assert summary["records"] == 50 and summary["failed"] == 0
    assert (tmp_path / "out" / "cache.sqlite").exists() and list((tmp_path / "out" / "trace").iterdir())


async def test_rerun_skips_written_ids_and_pays_nothing(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 30)
    async with FakeServer() as srv:
        cfg = EndpointConfig(base_url=srv.url, model="m", concurrency=4)
        await generate(inp, tmp_path / "out", cfg, progress=False)
        write_input(inp, 40)  # ten more lines appear
        summary = await generate(inp, tmp_path / "out", cfg, progress=False)
        assert len(srv.seen) == 40
    assert summary["skipped_existing"] == 30 and summary["ok"] == 10
    assert len(records(tmp_path / "out")) == 40


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "no id"}', "missing required field `id`"),
        (b'{"id": "x1"}', "needs `messages`"),
        (b'{"id": "x2", "messages": []}', "`messages` is empty"),
        (b'{"id": "x3", "messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
        (b'{"id": "x4", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b"[1, 2]", "Expected `object`"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(line, words):
    with pytest.raises(InputError) as err:
        parse_line(line, "in.jsonl:7")
    assert str(err.value).startswith("in.jsonl:7: ") and words in str(err.value)


async def test_bad_lines_are_reported_skipped_and_counted_and_the_run_goes_on(tmp_path, capsys):
    inp = write_input(
        tmp_path / "in.jsonl", 10, extra=[b"{broken", b"", b'{"id": "x1"}', b'{"id": 3, "prompt": "int id"}']
    )
    async with FakeServer() as srv:
        summary = await generate(
            inp, tmp_path / "out", EndpointConfig(base_url=srv.url, model="m"), progress=False
        )
    err = capsys.readouterr().err
    assert f"{inp}:11: not valid JSON" in err
    assert f"{inp}:13: needs `messages`" in err
    assert summary["bad_lines"] == 2 and summary["ok"] == 11 and summary["status"] == "done_with_failures"
    assert "3" in records(tmp_path / "out")
    assert count_lines(inp) == 14


async def test_cli_exit_codes_failed_records_and_refused_key(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20)
    async with FakeServer() as srv:
        srv.rule = lambda s: (
            ("status", 400, {"error": {"message": "prompt too long"}}, {})
            if "question 3" in str(s.body)
            else None
        )
        rc, _, err = await fair(*gen_args(srv, inp, tmp_path / "out1", "--concurrency", "4"))
        assert rc == 1, err
        assert "1 records failed" in err and "prompt too long" in err
        got = records(tmp_path / "out1")
        assert len(got) == 20 and "HTTP 400: prompt too long" in got["r3"]["error"]
        assert got["r3"]["texts"] == []

        srv.rule = lambda s: "status:401"
        rc, _, err = await fair(*gen_args(srv, inp, tmp_path / "out2"))
        assert rc == 3 and "aborted" in err and "refused the credentials" in err
        assert read_manifest(tmp_path / "out2")["status"] == "aborted"

        rc, _, err = await fair(*gen_args(srv, tmp_path / "missing.jsonl", tmp_path / "out3"))
        assert rc == 2 and "no such file" in err


async def test_sigkill_then_resume_gives_exactly_the_uninterrupted_output(tmp_path):
    n = 400
    inp = write_input(tmp_path / "in.jsonl", n)
    async with FakeServer(latency_s=0.01) as srv:
        ref = tmp_path / "ref"
        await generate(inp, ref, EndpointConfig(base_url=srv.url, model="m", concurrency=8), progress=False)
        srv.seen.clear()

        out = tmp_path / "out"
        rc, _, _ = await fair(
            *gen_args(srv, inp, out, "--concurrency", "8"), kill_when=lambda: len(srv.seen) >= 150
        )
        assert rc == -signal.SIGKILL
        partial = records(out)
        assert 0 < len(partial) < n
        assert any(p.name.endswith(".partial") for p in (out / "responses").iterdir())

        rc, _, err = await fair(*gen_args(srv, inp, out, "--concurrency", "8"))
        assert rc == 0, err
    want, got = records(ref), records(out)
    assert set(got) == set(want) == {f"r{i}" for i in range(n)}
    assert {k: v["texts"] for k, v in got.items()} == {k: v["texts"] for k, v in want.items()}
    assert read_manifest(out)["counts"]["responses"] == n
    assert len(srv.seen) < n + 50  # the resumed run did not redo what the killed one wrote
