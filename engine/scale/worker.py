"""The worker actor: runs whole blocks with the single-process code, one attempt (epoch) each.

A block attempt writes its records under the writer name ``<block>.e<epoch>`` and its manifest
to ``blocks/<block>.e<epoch>.json``; it sees (and so adopts, never redoes) the records of the
block's earlier attempts and nothing of other blocks. It is *fenced*: the driver rewrites
``blocks/<block>.fence`` (a new inode) whenever it hands the block to another attempt, and an
attempt that finds the inode changed stops before its next write, so a worker the driver gave
up on (a zombie) never writes beside its successor.

API keys: the engine reads them from *this* process's environment when it opens (``Engine``
``__aenter__``), every key of a pool alike; a worker without one reports ``config_error`` naming
the variable and the node, and the driver stops the run with exit 2. Nothing with a key crosses
Ray: a pool's keys travel as their variables' names and indexes (the limiter's ``KeyPool``
chooses the key of each lease; the proxy's ``key_of`` names it to the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray

from fairdistill.engine.config import EndpointConfig, RunConfig
from fairdistill.engine.errors import AbortRun, ConfigError, FairError, InputError
from fairdistill.engine.fair.budget import BudgetReached
from fairdistill.engine.fair.pipeline import KINDS, Job, JobParts
from fairdistill.engine.generate import ENDPOINT, KIND, Work, answer_lines, parse_line, run_summary
from fairdistill.engine.options import RequestOptions
from fairdistill.engine.progress import Progress
from fairdistill.engine.request.client import Engine
from fairdistill.engine.request.executor import HttpExecutor, Reply, Target
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.rundir.store import RunStore, recover_partial, shard_paths
from fairdistill.engine.scale import WORKER_CPUS
from fairdistill.engine.scale.budget import SharedBudget
from fairdistill.engine.scale.limiter import AdmissionProxy
from fairdistill.engine.scale.metrics import WorkerMetrics
from fairdistill.engine.scale.results import GenerateBlockResult, RunBlockResult
from fairdistill.engine.types import Message

START_BATCH = 32  # a block starts its tasks this many at a time (the limiter's cold start: 32)


class Fenced(FairError):
    """This attempt's block was handed to another attempt: stop writing."""


def fence_path(run_dir: Path, block: str) -> Path:
    return Path(run_dir) / "blocks" / f"{block}.fence"


def attempt_manifest(run_dir: Path, writer: str) -> Path:
    return Path(run_dir) / "blocks" / f"{writer}.json"


class FencedStore(RunStore):
    """A ``RunStore`` that refuses to write once its block's fence file was replaced."""

    def __init__(self, root: Path, block: str, epoch: int, *, pilot: bool = False, **kwargs: Any):
        """``pilot``: the attempt runs only the first problems of its block (``--estimate``)."""
        writer = f"{block}.e{epoch}"
        super().__init__(
            root, writer=writer, scope=f"{block}.", manifest=attempt_manifest(root, writer), **kwargs
        )
        self.fence = fence_path(root, block)
        self.inode = self.fence.stat().st_ino
        self.pilot = pilot

    def close(self, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A pilot's slice of a block is never the block done: the full run redoes the block
        under a new epoch, adopting the slice's records (and its cache)."""
        return super().close("pilot" if self.pilot and status.startswith("done") else status, extra)

    def check(self) -> None:
        try:
            ino = self.fence.stat().st_ino
        except FileNotFoundError:
            ino = -1
        if ino != self.inode:
            raise Fenced(f"{self.writer}: the block was handed to a newer attempt")

    def write(self, kind: str, record: Any) -> bool:
        self.check()
        return super().write(kind, record)

    def seal_predecessors(self, kinds: list[str]) -> None:
        """Seal the torn ``.partial`` shards of this block's earlier (dead) attempts."""
        for kind in kinds:
            for path in shard_paths(self.root, kind):
                name = path.name
                if (
                    name.endswith(".partial")
                    and name.startswith(f"shard-{self.scope}")
                    and self.writer not in name
                ):
                    recover_partial(path)


class _BlockLines(Work):
    """``generate.Work`` over one block's lines instead of a whole file."""

    def __init__(self, path: Path, lines: list[tuple[int, bytes]], store: RunStore):
        self._block_lines = lines
        super().__init__(path, store, report=False)  # the driver reported bad lines at plan time

    def _read(self) -> Iterator[tuple[str, tuple[Message, ...]]]:
        for lineno, raw in self._block_lines:
            if not raw.strip():
                continue
            try:
                record_id, messages = parse_line(raw, f"{self.path}:{lineno}")
            except InputError:
                self.bad_lines += 1
                continue
            if self.store.has(KIND, record_id):
                self.skipped += 1
                continue
            yield record_id, messages


class KeptExecutor:
    """The worker's one ``HttpExecutor``, opened by its first block and kept for the next ones:
    their connections are reused (a session per block opened ``concurrency`` new connections
    per block, at both ends, and a worker may run hundreds of blocks). Blocks close nothing;
    the sessions end with the worker process."""

    def __init__(self) -> None:
        self.inner = HttpExecutor()
        self.opened: set[str] = set()

    async def open(self, targets: Mapping[str, Target]) -> None:
        new = {name: t for name, t in targets.items() if name not in self.opened}
        if new:
            await self.inner.open(new)
            self.opened |= set(new)

    async def send(self, target: Target, body: bytes, key: str | None = None) -> Reply:
        return await self.inner.send(target, body, key)

    async def close(self) -> None:
        pass


def _node() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostname()


@ray.remote(num_cpus=WORKER_CPUS, max_restarts=0, max_task_retries=0)
class BlockWorker:
    """Runs blocks; one ``AdmissionProxy`` per endpoint shared by all its blocks."""

    def __init__(
        self, name: str, limiter: Any, endpoints: list[str], pid_dir: str, metrics: bool = False,
        pools: Mapping[str, int] | None = None,
    ):  # fmt: skip
        """``metrics``: keep request numbers over all blocks for the driver's ``/metrics``;
        ``pools``: the size of each key pool (its keys live in the limiter's ``KeyPool``)."""
        self.name = name
        self.limiter = limiter
        pools = pools or {}
        self.proxies = {ep: AdmissionProxy(limiter, name, ep, pools.get(ep, 1)) for ep in endpoints}
        self.executor = KeptExecutor()
        self.metrics = WorkerMetrics(endpoints if metrics else [])  # (--metrics-port)
        self.observers = self.metrics.observers if metrics else ()
        self.pid_dir = Path(pid_dir)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        (self.pid_dir / name).write_text(f"{os.getpid()}\n")

    def pid(self) -> int:
        return os.getpid()

    def metrics_snapshot(self) -> dict[str, Any]:
        """This worker's request numbers, plain (pulled by the driver at scrape time)."""
        return self.metrics.snapshot({ep: p.effective_rpm() for ep, p in self.proxies.items()})

    def _mark(self, writer: str) -> Path:
        """``blocks/pids/<block>.e<epoch>`` holds the pid running that attempt (while it runs)."""
        path = self.pid_dir / writer
        path.write_text(f"{os.getpid()} {self.name} {_node()}\n")
        return path

    async def generate(
        self, out: str, input_path: str, endpoint: EndpointConfig, block: str, epoch: int,
        lines: list[tuple[int, bytes]], opts: RequestOptions, cache: bool,
    ) -> GenerateBlockResult:  # fmt: skip
        """One attempt at a ``fair generate`` block; returns its summary (``status`` says how it
        ended: done, done_with_failures, aborted, config_error, fenced)."""
        root = Path(out)
        store = FencedStore(root, block, epoch)
        mark = self._mark(store.writer)
        store.seal_predecessors([KIND, "trace"])
        store.open([KIND])
        work = _BlockLines(Path(input_path), lines, store)
        engine = Engine(
            {ENDPOINT: endpoint},
            cache_path=root / "cache" / f"{block}.sqlite" if cache else None,
            trace_dir=root / "trace",
            writer=store.writer,
            admissions={ENDPOINT: self.proxies[ENDPOINT]},
            executor=self.executor,
            observers=self.observers,
        )
        bar = Progress(None, enabled=False)
        status, error = "interrupted", None
        started = time.monotonic()
        try:
            async with engine, asyncio.TaskGroup() as tg:
                for i in range(max(1, min(endpoint.concurrency, len(lines)))):
                    tg.create_task(answer_lines(engine, work, store, bar, opts))
                    if i % START_BATCH == START_BATCH - 1:  # let the first asks go to the limiter
                        await asyncio.sleep(0)
            status = "done_with_failures" if work.failed or work.bad_lines else "done"
        except* ConfigError as eg:
            status, error = "config_error", f"{eg.exceptions[0]} on node {_node()}"
        except* Fenced as eg:
            status, error = "fenced", str(eg.exceptions[0])
        except* AbortRun as eg:
            status, error = "aborted", str(eg.exceptions[0])
        finally:
            summary = run_summary(work, engine, store, status, time.monotonic() - started, endpoint)
            if status != "fenced":
                store.close(status, {"generate": summary, "endpoints": engine.snapshot(), "block": block})
            mark.unlink(missing_ok=True)
        proxy = self.proxies[ENDPOINT].counters()
        return GenerateBlockResult(
            status=status,
            error=error,
            block=block,
            epoch=epoch,
            worker=self.name,
            summary=summary,
            proxy=proxy,
        )

    async def run(
        self, out: str, cfg: RunConfig, block: str, epoch: int, problems: list[Problem], pilot: bool = False
    ) -> RunBlockResult:
        """One attempt at a ``fair run`` block: ``pipeline.Job`` on its problems (``pilot``: only
        the first of them, for ``--estimate``; the attempt is then stored as ``pilot``, not done)."""
        root = Path(out)
        store = FencedStore(root, block, epoch, pilot=pilot, shard_records=cfg.run.shard_records)
        mark = self._mark(store.writer)
        store.seal_predecessors([*KINDS, "trace"])
        cap = cfg.run.max_cost_usd
        budget = SharedBudget(self.limiter, store.writer, cap) if cap is not None else None
        admissions = {ep: self.proxies[ep] for ep in cfg.endpoints if cfg.endpoints[ep].mode != "batch"}
        parts = JobParts(executor=self.executor, admissions=admissions, observers=tuple(self.observers))
        job = Job(
            cfg,
            root,
            progress=False,
            writer=store.writer,
            part=store.manifest_path,
            parts=parts,
            budget=budget,
        )
        job.store = store  # the same store, fenced
        self.metrics.add_job(job.stage_counts)
        status, error = "interrupted", None
        try:
            result = await job.run(problems, total=len(problems))
            status = result["status"]
        except BudgetReached as exc:  # stopped admitting at the cap, in-flight problems finished
            status, error = "budget", str(exc)
        except ConfigError as exc:
            status, error = "config_error", f"{exc} on node {_node()}"
        except Fenced as exc:
            status, error = "fenced", str(exc)
        except AbortRun as exc:
            status, error = "aborted", str(exc)
        finally:
            mark.unlink(missing_ok=True)
            self.metrics.end_job(job.stage_counts)
            if budget is not None and job.engine is not None:  # its last word to the ledger
                with contextlib.suppress(ray.exceptions.RayError):
                    await self.limiter.report.remote(store.writer, budget.mine(job.engine), job.finished)
        return RunBlockResult(
            status=status, error=error, block=block, epoch=epoch, worker=self.name,
            failed_problems=job.failed_problems, counts=job.ctx.counts.as_dict() if job.ctx else {},
        )  # fmt: skip
