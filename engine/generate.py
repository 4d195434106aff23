"""``fair generate``: the engine as a plain, resumable, high-throughput generator.

One chat request per input line (``{"id": ..., "messages": [...]}`` or ``{"id": ...,
"prompt": "..."}``), one ``Response`` record per input id in ``OUTPUT/responses/``::

    OUTPUT/responses/shard-*.jsonl   one record per id (``error`` set when it failed for good)
    OUTPUT/cache.sqlite              response cache (--no-cache: none)
    OUTPUT/trace/shard-*.jsonl       one line per API call
    OUTPUT/manifest.json             counts, shards with sha256, endpoint stats, status

The input is streamed: a fixed pool of workers (as many as the endpoint's concurrency) pulls
lines one at a time, so memory stays flat over any number of lines. A record is written the
moment its answer arrives; on restart every id already written is skipped, so a run killed at
any point and started again ends with exactly the records of an uninterrupted run.

Progress is ``engine.progress`` (a rich bar, plain lines off a terminal); ``--metrics-port``
serves Prometheus metrics while it runs (``engine.request.metrics``).

A bad input line is reported as ``file:line: why`` on stderr, skipped and counted; the run goes
on. Exit code: 0 all written, 1 some records failed or lines were bad (counts on stderr),
3 aborted (credentials refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AbortRun, ConfigError, InputError, RequestError, one_line
from fairdistill.engine.inputs import MAX_REPORTED, BadLines
from fairdistill.engine.options import Outcome, RequestOptions
from fairdistill.engine.progress import Progress
from fairdistill.engine.request.cache import looks_usable
from fairdistill.engine.request.client import Engine
from fairdistill.engine.request.metrics import serve_engine
from fairdistill.engine.rundir.idset import HashSet64, id_hash
from fairdistill.engine.rundir.schema import Response
from fairdistill.engine.rundir.store import RunStore, read_manifest, shard_paths
from fairdistill.engine.rundir.verify import check_run_dir
from fairdistill.engine.types import ChatRequest, Message, response_record

ENDPOINT = "default"
KIND = "responses"


class _Line(msgspec.Struct):
    id: str | int
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None


_line_decoder = msgspec.json.Decoder(_Line)
_ROLES = frozenset({"system", "user", "assistant"})


def parse_line(raw: bytes, where: str) -> tuple[str, tuple[Message, ...]]:
    """One input line -> (id, messages). ``InputError`` naming ``where`` (file:line) if bad."""
    try:
        line = _line_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InputError(f"{where}: {str(exc).replace('`$.', '`')}") from None
    except msgspec.DecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    record_id = str(line.id)
    if not record_id:
        raise InputError(f"{where}: empty `id`")
    if line.messages is not None:
        if not line.messages:
            raise InputError(f"{where}: `messages` is empty")
        for i, m in enumerate(line.messages):
            if m.role not in _ROLES:
                raise InputError(
                    f"{where}: `messages[{i}].role` is {m.role!r}; expected system, user or assistant"
                )
        return record_id, line.messages
    if line.prompt is not None:
        return record_id, (Message("user", line.prompt),)
    raise InputError(f"{where}: needs `messages` (a list of {{role, content}}) or `prompt` (a string)")


def count_lines(path: Path) -> int:
    """Lines, counted fast (for the progress total; blank and bad lines are taken off it later)."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


class _IdView(msgspec.Struct):
    """Only the id of an input line: msgspec skips the rest unparsed (a resume reads every line)."""

    id: str | int


_id_view = msgspec.json.Decoder(_IdView)


class Work:
    """The shared input stream the workers pull from, with the run's counters.

    Memory per input line stays compact: the ids this run sends are a ``HashSet64`` (~9 bytes an
    id) and the lines whose record exists already are only counted (their hashes, 8 bytes each,
    are kept until the input is read, to count duplicates among them), never a dict of the ids."""

    def __init__(self, path: Path, store: RunStore, report: bool):
        self.path = path
        self.store = store
        self.report = report
        self.bad_lines = 0
        self.duplicates = 0
        self.skipped = 0  # already written by an earlier run
        self.ok = 0
        self.failed = 0
        self.failures: list[str] = []  # first few failed ids with their reason
        self.in_flight: set[str] = set()
        self.progress: Progress | None = None
        self.reported = BadLines(report)  # bad and duplicate lines, named up to engine.inputs' limit
        self._lines = self._read()

    def _drop(self) -> None:
        """A line that will have no record: take it off the progress total."""
        if self.progress is not None and self.progress.total:
            self.progress.total -= 1

    def _read(self) -> Iterator[tuple[str, tuple[Message, ...]]]:
        stored = self.store.ids(KIND).hashes
        seen = HashSet64()  # ids sent by this run
        existing = array("Q")  # lines whose record exists: skipped, their duplicates counted at the end
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as some editors write
                try:  # fast path of a resume: the id alone tells that its record exists
                    rid: str | None = str(_id_view.decode(raw).id)
                except (msgspec.DecodeError, RecursionError):
                    rid = None
                h = id_hash(rid) if rid is not None else None
                if h is not None and h in stored and h not in seen:
                    existing.append(h)
                    self.skipped += 1
                    continue
                if (item := self._parse(raw, lineno, seen, (rid, h))) is not None:
                    yield item
        self._count_existing_duplicates(existing)
        self.reported.close()

    def _parse(
        self, raw: bytes, lineno: int, seen: HashSet64, looked: tuple[str | None, int | None]
    ) -> tuple[str, tuple[Message, ...]] | None:
        """A line to send, or None (blank, bad, a duplicate, or its record exists). ``looked``:
        the id ``_read`` saw and its hash, which it found not stored (or already seen): the
        same id is neither hashed nor looked up again."""
        if not raw.strip():
            self._drop()
            return None
        try:
            record_id, messages = parse_line(raw, f"{self.path}:{lineno}")
        except InputError as exc:
            self.bad_lines += 1
            self._drop()
            self.reported.append(exc)
            return None
        rid, h = looked  # (both read ``str(id)``: they agree on every line both can read)
        hashed = h if h is not None and rid == record_id else id_hash(record_id)
        if not seen.add(hashed):
            self.duplicates += 1
            self._drop()
            if self.reported.report and self.reported.count < self.reported.limit:
                first = self._first_line(record_id)  # a rare path: reads the input again
                self.reported.skip(
                    f"{self.path}:{lineno}: duplicate id {one_line(record_id, 80)!r} (first on line {first})"
                )
            else:
                self.reported.skip("")
            return None
        if hashed != h and hashed in self.store.ids(KIND).hashes:  # ``_read`` found h not stored
            self.skipped += 1
            return None
        return record_id, messages

    def _first_line(self, record_id: str) -> int:
        """The line an id was first seen on, found again by reading the input (a rare path)."""
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    if str(_id_view.decode(raw.removeprefix(b"\xef\xbb\xbf")).id) == record_id:
                        return lineno
                except (msgspec.DecodeError, RecursionError):
                    continue
        return 0

    def _count_existing_duplicates(self, existing: array) -> None:
        """Lines repeating the id of another line whose record exists: duplicates, as in the
        run that wrote them (counted here, not named again line by line)."""
        repeated = len(existing) - len(HashSet64.build(existing, len(existing)))
        if repeated:
            self.duplicates += repeated
            self.skipped -= repeated
            for _ in range(repeated):
                self._drop()
            if self.report:
                print(
                    f"fair: skipped {repeated} input lines repeating the id of another line "
                    "(its record was written by an earlier run)",
                    file=sys.stderr,
                )

    def next(self) -> tuple[str, tuple[Message, ...]] | None:
        return next(self._lines, None)


async def generate(
    input_path: str | Path,
    output_dir: str | Path,
    endpoint: EndpointConfig,
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    n: int = 1,
    seed: int | None = None,
    cache: bool = True,
    progress: bool = True,
    writer: str = "",
    metrics_port: int | None = None,
    compress: str = "none",
) -> dict[str, Any]:
    """Run ``fair generate`` in-process; returns the summary written to the manifest.
    ``compress = "zstd"``: sealed record and trace shards are compressed (``--compress``).

    Raises ``AbortRun`` (e.g. ``AuthError``) when the run must stop; records written until
    then stay, and the manifest says ``aborted``. ``metrics_port``: serve Prometheus metrics
    (``engine.request.metrics``) there while it runs.
    """
    input_path, out = Path(input_path), Path(output_dir)
    if not input_path.is_file():
        raise ConfigError(f"--input {input_path}: no such file")
    endpoint.name = endpoint.name or ENDPOINT
    check_run_dir(out)  # the rules `fair status` applies: a changed or newer run dir is refused
    fingerprint = input_fingerprint(input_path)
    if (finished := already_finished(out, fingerprint)) is not None:
        return finished
    store = RunStore(out, writer=writer, compress=compress).open([KIND])
    work = Work(input_path, store, report=True)
    total = count_lines(input_path)
    engine, workers = _engine(out, endpoint, total, cache=cache, writer=writer, compress=compress)
    opts = RequestOptions(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed)
    status = "interrupted"
    started = time.monotonic()
    try:
        async with engine:
            bar = Progress(total, label="responses", enabled=progress)
            bar.resumed = store.count(KIND)
            if progress:
                engine.observe(bar)
            work.progress = bar
            metrics = serve_engine(engine, metrics_port)
            with bar, metrics or contextlib.nullcontext():
                try:
                    await _answer_all(engine, endpoint, work, store, bar, opts, workers)
                except AbortRun:
                    status = "aborted"
                    raise
            bad = work.failed or work.bad_lines or work.duplicates
            status = "done_with_failures" if bad else "done"
    finally:
        elapsed = time.monotonic() - started
        summary = run_summary(work, engine, store, status, elapsed, endpoint)
        summary["input"] = fingerprint
        store.close(status, {"generate": summary, "endpoints": engine.snapshot()})
    return summary


def _engine(
    out: Path, endpoint: EndpointConfig, total: int, *, cache: bool, writer: str, compress: str
) -> tuple[Engine, int]:
    """The run's engine, and how many workers pull lines: the endpoint's concurrency online;
    with ``mode = "batch"`` a provider Batch API, where requests wait in batches, not in admission."""
    parts: dict[str, Any] = {}
    workers = endpoint.concurrency
    if endpoint.mode == "batch":
        from fairdistill.engine.request.batch.executor import BatchExecutor  # only for batch mode

        executor = BatchExecutor(out)  # its admission picks each request's key of a pool
        parts = {"executor": executor, "admissions": {ENDPOINT: executor.admission(ENDPOINT, endpoint)}}
        workers = max(1, min(total, endpoint.batch.max_items * endpoint.batch.max_open))
    engine = Engine(
        {ENDPOINT: endpoint},
        cache_path=out / "cache.sqlite" if cache else None,
        trace_dir=out / "trace",
        writer=writer,
        compress=compress,
        executor=parts.get("executor"),
        admissions=parts.get("admissions"),
    )
    return engine, workers


async def _answer_all(
    engine: Engine,
    endpoint: EndpointConfig,
    work: Work,
    store: RunStore,
    bar: Progress,
    opts: RequestOptions,
    workers: int,
) -> None:
    """Answer every line; raises what a worker raised (``AbortRun``, an ``OSError`` writing a
    shard: one line, exit 2), unwrapped from the task group."""
    streamed = endpoint.mode == "batch" and (opts.n == 1 or endpoint.provider == "openai")  # else: fan-out
    try:
        async with asyncio.TaskGroup() as tg:
            if streamed:  # batch mode: no coroutine per waiting line (engine.request.batch.feed)
                from fairdistill.engine.request.batch.feed import feed

                req = msgspec.structs.asdict(opts)
                tg.create_task(feed(engine, ENDPOINT, work, store, bar, KIND, **req))
            for _ in range(0 if streamed else workers):
                tg.create_task(answer_lines(engine, work, store, bar, opts))
    except BaseExceptionGroup as eg:  # a worker raised: unwrap what callers catch
        abort = eg.subgroup(AbortRun)
        if abort is not None:
            raise abort.exceptions[0] from None
        written = eg.subgroup(OSError)
        if written is not None and written.exceptions:
            raise written.exceptions[0] from None
        raise


def input_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies the input a run read: its size and sha256 (~60 ms for 1M lines)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def already_finished(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a rerun with nothing to do, or None. Nothing to do: the last run read this
    very input to its end (status done or done_with_failures, the same size and sha256) and no
    shard was written since (none ``.partial``, the counts as the manifest has them). Such a
    rerun would read every line only to skip it (~3 us a line: 3 s at 1M); its outcome is known.
    ``check_run_dir`` has verified the shards against the manifest's digests already."""
    manifest = read_manifest(out) or {}
    last = manifest.get("generate")
    if manifest.get("status") not in ("done", "done_with_failures") or not isinstance(last, dict):
        return None
    if last.get("input") != fingerprint or last.get("records") != (manifest.get("counts") or {}).get(KIND):
        return None
    if any(p.name.endswith(".partial") for p in shard_paths(out, KIND)):
        return None
    if not looks_usable(out / "cache.sqlite"):  # damaged or read-only: the full path says so
        return None
    bad = bool(last.get("bad_lines") or last.get("duplicate_ids"))
    zero = dict.fromkeys(("ok", "failed", "calls", "cache_hits", "http_429", "retries", "prompt_tokens",
                          "completion_tokens"), 0)  # fmt: skip
    now = {"status": "done_with_failures" if bad else "done", "elapsed_s": 0.0, "records_per_s": 0.0,
           "cost_usd": 0.0, "failures": [], "skipped_existing": last["records"]}  # fmt: skip
    return {**last, **zero, **now}


async def answer_lines(
    engine: Engine, work: Work, store: RunStore, bar: Progress, opts: RequestOptions
) -> None:
    """One of the run's workers: answers ``work``'s lines one at a time until none is left, a
    record written for each (``error`` set when it failed for good)."""
    while (item := work.next()) is not None:
        record_id, messages = item
        work.in_flight.add(record_id)
        request = ChatRequest(
            messages=messages,
            max_tokens=opts.max_tokens,
            temperature=opts.temperature,
            n=opts.n,
            seed=opts.seed,
        )
        try:
            done = await engine.complete(ENDPOINT, request)
        except RequestError as exc:
            record = Response(id=record_id, error=str(exc))
            work.failed += 1
            if len(work.failures) < MAX_REPORTED:
                work.failures.append(f"{record_id}: {exc}")
        else:
            record = response_record(record_id, done)
            work.ok += 1
        finally:
            work.in_flight.discard(record_id)
        store.write(KIND, record)
        bar.done += 1


def run_summary(
    work: Work, engine: Engine, store: RunStore, status: str, elapsed: float, endpoint: EndpointConfig
) -> dict[str, Any]:
    st = engine.stats[ENDPOINT]
    done = work.ok + work.failed
    return {
        "status": status,
        "endpoint": {"provider": endpoint.provider, "base_url": endpoint.base_url, "model": endpoint.model},
        "records": store.count(KIND),
        "ok": work.ok,
        "failed": work.failed,
        "skipped_existing": work.skipped,
        "bad_lines": work.bad_lines,
        "duplicate_ids": work.duplicates,
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(done / elapsed, 2) if elapsed > 0 else 0.0,
        "calls": st.calls,
        "cache_hits": st.cache_hits,
        "http_429": st.http_429,
        "retries": st.retries,
        "prompt_tokens": st.prompt_tokens,
        "completion_tokens": st.completion_tokens,
        "cost_usd": round(st.cost_usd, 6),
        "failures": work.failures,
        **({"batch": dict(engine.executor.stats)} if endpoint.mode == "batch" else {}),  # type: ignore[attr-defined]
    }


def generate_outcome(out: Path, summary: dict[str, Any], line: str) -> Outcome:
    """A finished generate run (one process or Ray): its failures and its one summary ``line``
    (with what went wrong appended) for stderr; failed (exit 1) when records failed or lines
    were skipped."""
    lines = [f"fair: failed: {one_line(failure)}" for failure in summary["failures"]]
    problems = []
    if summary["failed"]:
        problems.append(f"{summary['failed']} records failed (their `error` says why)")
    if summary["bad_lines"]:
        problems.append(f"{summary['bad_lines']} input lines were bad and skipped")
    if summary["duplicate_ids"]:
        problems.append(f"{summary['duplicate_ids']} input lines repeated an earlier id and were skipped")
    lines.append(line + (f"; {'; '.join(problems)}" if problems else ""))
    return Outcome(out, summary["status"], failed=len(problems), lines=lines)
