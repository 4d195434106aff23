"""The FAIR job as a streaming per-problem DAG (docs/concepts/method.md).

Each problem runs on its own: student attempts → grading → for every teacher, concurrently, a
rationale (→ gold check → peer review → threshold) and an explanation of each mistake →
samples. Nothing waits for a phase to end, so the review of problem 1 overlaps the generation
of problem 900. Problems stream in (``Job.run`` takes any iterable or async iterable): at most
``run.max_in_flight`` problems are held in memory, whatever the dataset's size.

Resume: a problem is finished once its ``problems`` record is written (last). Records of
unfinished problems are indexed on open and read back when their problem runs again
(``engine.fair.resume``), and every completed call is in the cache, so a re-run after SIGKILL pays
nothing twice and writes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdistill.engine.config import RunConfig, dump_config
from fairdistill.engine.errors import BreakerTripped, RequestError
from fairdistill.engine.fair import datasets, splits
from fairdistill.engine.fair.budget import Budget, BudgetGate, BudgetReached, spent_before
from fairdistill.engine.fair.prompts import prompt_set
from fairdistill.engine.fair.report import write_report
from fairdistill.engine.fair.resume import PriorRecords
from fairdistill.engine.fair.stages import review as review_stage
from fairdistill.engine.fair.stages import samples as samples_stage
from fairdistill.engine.fair.stages import student, teachers
from fairdistill.engine.fair.stages.context import StageContext
from fairdistill.engine.fair.stages.counts import StageCounts
from fairdistill.engine.fair.stages.threshold import judge, skips_review
from fairdistill.engine.inputs import BadLines
from fairdistill.engine.options import Outcome
from fairdistill.engine.progress import Progress
from fairdistill.engine.request.client import Admitter, Engine
from fairdistill.engine.request.events import Observer
from fairdistill.engine.request.executor import Executor
from fairdistill.engine.request.metrics import serve_engine
from fairdistill.engine.rundir.index import StoredIds
from fairdistill.engine.rundir.schema import (
    Attempt,
    Failure,
    Feedback,
    Problem,
    ProblemDone,
    Rationale,
    Score,
)
from fairdistill.engine.rundir.store import RunStore
from fairdistill.engine.rundir.verify import check_run_dir

KINDS = ["attempts", "rationales", "feedback", "reviews", "samples", "failures", "problems"]
REUSED_KINDS = ["attempts", "rationales", "feedback", "reviews"]


@dataclass(frozen=True)
class JobParts:
    """What replaces the engine's defaults (HTTP, local admission per endpoint): an executor (a
    Batch API, a worker's kept sessions), admissions (a proxy of the cluster's limiter) and
    observers of the request events (a Ray worker's metrics)."""

    executor: Executor | None = None
    admissions: Mapping[str, Admitter] | None = None
    observers: tuple[Observer, ...] = ()


def batch_parts(cfg: RunConfig, run_dir: Path, parts: JobParts) -> JobParts:
    """``parts`` with a Batch API executor when endpoints have ``mode = "batch"`` (and none was
    given): those endpoints wait in batches, not in admission."""
    if parts.executor is not None or not any(ep.mode == "batch" for ep in cfg.endpoints.values()):
        return parts
    from fairdistill.engine.request.batch.executor import BatchExecutor  # only for batch endpoints

    executor = BatchExecutor(run_dir)  # its admissions pick each request's key of a pool
    batch: dict[str, Admitter] = {
        n: executor.admission(n, ep) for n, ep in cfg.endpoints.items() if ep.mode == "batch"
    }
    return JobParts(executor, {**batch, **(parts.admissions or {})}, parts.observers)


class Job:
    """One ``fair run``: owns the store, the engine and the per-problem tasks."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        progress: bool = True,
        writer: str = "",
        metrics_port: int | None = None,
        parts: JobParts | None = None,
        part: Path | None = None,
        budget: BudgetGate | None = None,
    ):
        """``parts`` replace the engine's defaults (``JobParts``: a shared limiter or a Batch API
        plugs in there, the stages unchanged); ``budget`` the ``run.max_cost_usd`` check (a
        cluster-wide ledger: ``engine.scale``).
        ``part``: this job is one block of a bigger run (``engine.scale``): its manifest goes to
        ``part``, it sees only shards of writers starting with ``writer``'s block, keeps its
        cache in ``cache/<block>.sqlite`` and leaves config.toml and report.md to the driver."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.part = part
        block = writer.split(".e")[0] + "." if part is not None else None
        self.store = RunStore(
            self.run_dir,
            writer=writer,
            shard_records=cfg.run.shard_records,
            scope=block,
            manifest=part,
            compress=cfg.run.compress,
        )
        self.cache_path = self.run_dir / ("cache.sqlite" if block is None else f"cache/{block}sqlite")
        self.progress = progress
        self.recent: collections.deque[bool] = collections.deque(maxlen=cfg.run.breaker_window)
        self.failed_problems: list[str] = []
        self.ctx: StageContext | None = None
        self.engine: Engine | None = None  # while it runs (a Ray worker reports its spend from it)
        self.total: int | None = 0
        self.finished = 0  # problems finished in this run
        self.metrics_port = metrics_port
        self.parts = batch_parts(cfg, self.run_dir, parts or JobParts())
        self.budget = budget
        self.started = time.monotonic()

    # -- one problem ----------------------------------------------------------------------
    def _fail(self, problem: Problem, stage: str, exc: Exception) -> None:
        self.store.write(
            "failures",
            Failure(id=f"{problem.id}/failure/{stage}", problem_id=problem.id, stage=stage, reason=str(exc)),
        )

    async def _rationale_path(self, ctx: StageContext, problem: Problem, teacher: str) -> Rationale | None:
        try:
            r = await teachers.rationale(ctx, problem, teacher)
        except RequestError as exc:
            self._fail(problem, f"rationale/{teacher}", exc)
            return None
        if r.status:  # judged by an interrupted run already
            return r
        rule = self.cfg.review
        scores: list[Score] = []
        if not skips_review(r, rule):
            full = rule.gold_check == "review-anyway" and r.gold_match is False
            reviews, scores = await review_stage.review(
                ctx, problem, r.id, teacher, r.text, early_stop=False if full else None
            )
            for rv in reviews:
                self.store.write("reviews", rv)
        r = judge(r, scores, rule, ctx.calibration)
        self.store.write("rationales", r)
        ctx.counts.judged(r.status)
        return r

    async def _feedback_path(
        self, ctx: StageContext, problem: Problem, teacher: str, mistake: Attempt
    ) -> tuple[Feedback, list[Score], bool] | None:
        try:
            f = await teachers.feedback(ctx, problem, teacher, mistake)
        except RequestError as exc:
            self._fail(problem, f"feedback/{teacher}/{mistake.sample_index}", exc)
            return None
        self.store.write("feedback", f)
        ctx.counts.feedback += 1
        if not self.cfg.review.review_feedback:
            return f, [], True
        reviews, scores = await review_stage.review(ctx, problem, f.id, teacher, f.text, mistake=mistake)
        for rv in reviews:
            self.store.write("reviews", rv)
        verdict = judge(
            Rationale(
                id=f.id, problem_id=f.problem_id, teacher=teacher, text="", answer=None, gold_match=None
            ),
            scores,
            self.cfg.review,
            ctx.calibration,
        )
        return f, scores, verdict.accepted

    async def process(self, problem: Problem) -> bool:
        """Run one problem through every stage; True when it finished without a failed call."""
        ctx = self.ctx
        assert ctx is not None
        try:
            attempts = await student.attempts(ctx, problem)
        except RequestError as exc:
            self._fail(problem, "student", exc)
            return False
        for a in attempts:
            self.store.write("attempts", a)
        wrong = student.mistakes(attempts)
        ctx.counts.attempts += len(attempts)
        ctx.counts.mistakes += len(wrong)
        if not wrong:
            self.store.write(
                "problems",
                ProblemDone(id=problem.id, status="correct", dataset=problem.dataset, attempts=len(attempts)),
            )
            return True

        names = self.cfg.teachers.endpoints
        rationale_tasks = [self._rationale_path(ctx, problem, t) for t in names]
        feedback_tasks = [self._feedback_path(ctx, problem, t, m) for m in wrong for t in names]
        judged, fb = await asyncio.gather(asyncio.gather(*rationale_tasks), asyncio.gather(*feedback_tasks))
        rationales = [r for r in judged if r is not None]
        if len(rationales) < len(judged) or any(x is None for x in fb):
            return False  # retried on resume; samples wait until the problem is whole

        explanations: dict[str, list[Feedback]] = {}
        fb_scores: dict[str, list[Score]] = {}
        for item in fb:
            assert item is not None
            f, scores, ok = item
            fb_scores[f.id] = scores
            if ok:
                explanations.setdefault(f.attempt_id, []).append(f)
        accepted = [r for r in rationales if r.accepted]
        made = samples_stage.build(ctx, problem, accepted, explanations, wrong, fb_scores)
        for s in made:
            self.store.write("samples", s)
        ctx.counts.samples += len(made)
        self.store.write(
            "problems",
            ProblemDone(
                id=problem.id,
                status="mistakes",
                dataset=problem.dataset,
                attempts=len(attempts),
                mistakes=len(wrong),
                rationales=len(rationales),
                accepted=len(accepted),
                feedback=len(fb),
                samples=len(made),
            ),
        )
        return True

    # -- the run --------------------------------------------------------------------------
    def _record_outcome(self, problem: Problem, ok: bool) -> None:
        self.recent.append(ok)
        if not ok:
            self.failed_problems.append(problem.id)
        window = self.recent
        if len(window) >= min(window.maxlen or 0, 20):
            rate = window.count(False) / len(window)
            if rate >= self.cfg.run.breaker_rate:
                raise BreakerTripped(
                    f"{window.count(False)} of the last {len(window)} problems failed "
                    f"(breaker_rate={self.cfg.run.breaker_rate}); see {self.run_dir}/failures"
                )

    async def run(
        self, problems: Iterable[Problem] | AsyncIterable[Problem], total: int | None = None
    ) -> dict:
        """Run every problem not finished yet; ``problems`` is consumed as it goes."""
        budget: BudgetGate = self.budget or Budget(self.cfg.run.max_cost_usd, spent_before(self.run_dir))
        done = self._open()
        self.total = total if total is not None else len(problems) if isinstance(problems, Sized) else None
        prior = PriorRecords(self.run_dir, REUSED_KINDS, done, scope=self.store.scope)
        status = "interrupted"
        seen = 0
        async with Engine(
            self.cfg.endpoints,
            cache_path=self.cache_path,
            trace_dir=self.run_dir / "trace",
            writer=self.store.writer,
            compress=self.cfg.run.compress,
            executor=self.parts.executor,
            admissions=self.parts.admissions,
            observers=self.parts.observers,
        ) as engine:
            self.engine = engine
            self.ctx = ctx = StageContext(
                engine=engine, cfg=self.cfg, prompts=prompt_set(self.cfg.prompts), prior=prior
            )
            bar = Progress(self.total, label="problems", enabled=self.progress, extra=self._progress_fields)
            bar.resumed = len(done)
            if self.progress:
                engine.observe(bar)
            slots = asyncio.Semaphore(self.cfg.run.max_in_flight)

            async def one(p: Problem) -> None:
                try:
                    prior.load(p.id)
                    self._record_outcome(p, await self.process(p))
                finally:
                    prior.drop(p.id)
                    self.finished += 1
                    bar.done += 1
                    slots.release()

            try:
                metrics = serve_engine(engine, self.metrics_port, self.stage_counts)
                with bar, metrics or contextlib.nullcontext():
                    async with asyncio.TaskGroup() as tg:
                        async for p in _stream(problems):
                            seen += 1
                            if p.id in done:
                                ctx.counts.resumed_done += 1
                                continue
                            await slots.acquire()
                            if not await self._admit(budget, engine, seen - ctx.counts.resumed_done):
                                slots.release()
                                break
                            tg.create_task(one(p))
                        self.total = bar.total = seen
                status = "done" if not self.failed_problems else "done_with_failures"
                status = "budget" if budget.stopped else status
            except* Exception as eg:
                status = "aborted"
                raise eg.exceptions[0] from None
            finally:
                self._close(status, engine, budget)
        self._finish(engine, budget)
        return {"status": status, "failed_problems": self.failed_problems, "counts": ctx.counts.as_dict()}

    def _open(self) -> StoredIds:
        """Open the store (a single-process run checks the run directory first, as ``fair status``
        does, and writes its config); the ids of the problems finished already."""
        if self.part is None:  # a Ray block: the driver checked the run directory once
            check_run_dir(self.run_dir)  # the rules `fair status` applies (engine.rundir.verify)
        self.store.open(KINDS)
        if self.part is None:
            (self.run_dir / "config.toml").write_bytes(dump_config(self.cfg))
        return self.store.ids("problems")

    def _close(self, status: str, engine: Engine, budget: BudgetGate) -> None:
        """Write the manifest (this block's, for a Ray block), whatever ended the run."""
        close_fair(self.store, self.cfg, status, self.total, engine.snapshot(), budget.fields(engine))

    def _finish(self, engine: Engine, budget: BudgetGate) -> None:
        """The report (one process; the driver writes a Ray run's), then ``BudgetReached`` at the cap."""
        if self.part is None:
            write_report(self.run_dir)
        if budget.stopped:
            raise BudgetReached(
                f"run.max_cost_usd = {budget.cap:g} reached (${budget.spent(engine):.4f} spent in "
                f"{self.run_dir}); raise it and run again to go on (nothing is paid twice)"
            )

    async def _admit(self, budget: BudgetGate, engine: Engine, started: int) -> bool:
        """Whether the next problem may start under ``run.max_cost_usd`` (waits while the first
        problems establish a cost per problem)."""
        while not budget.admit(engine, self.finished, started - 1 - self.finished):
            if budget.stopped:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- progress and metrics -------------------------------------------------------------
    def _progress_fields(self) -> str:
        c = self.ctx.counts if self.ctx is not None else StageCounts()
        return (
            f"mistakes {c.mistakes} | rationales ok {c.accepted} "
            f"gold✗ {c.rejected_gold} review✗ {c.rejected_review}"
        )

    def stage_counts(self) -> dict[tuple[str, str], float]:
        """Per stage and outcome, for ``fair_stage_total`` (engine.request.metrics)."""
        c = self.ctx.counts if self.ctx is not None else StageCounts()
        out: dict[tuple[str, str], float] = {
            ("problems", "done"): self.finished - len(self.failed_problems),
            ("problems", "failed"): len(self.failed_problems),
            ("student", "attempts"): c.attempts,
            ("student", "mistakes"): c.mistakes,
            ("feedback", "written"): c.feedback,
            ("samples", "written"): c.samples,
        }
        for status, n in c.statuses().items():
            out[("rationales", status)] = n
        return out


async def _stream(problems: Iterable[Problem] | AsyncIterable[Problem]) -> AsyncIterator[Problem]:
    if isinstance(problems, AsyncIterable):
        async for p in problems:
            yield p
    else:
        for p in problems:
            yield p


def close_fair(
    store: RunStore,
    cfg: RunConfig,
    status: str,
    total: int | None,
    endpoints: Mapping[str, Any],
    budget: Mapping[str, Any],
    **extra: Any,
) -> None:
    """A FAIR run's manifest (one process, a Ray block, or the Ray run merged by its driver):
    the status, the counts and shards (``RunStore.close``), the problems, the endpoints' figures,
    the split's fields, the ``budget`` table, and ``extra`` (the ``ray`` table)."""
    fields = {"problems_total": total, "endpoints": endpoints}
    fields |= splits.manifest_fields(cfg.dataset, store.ids("problems"))
    store.close(status, {**fields, **budget, **extra})


def load_problems(cfg: RunConfig) -> list[Problem]:
    """The dataset as a list, with bad lines reported (file:line) and skipped."""
    bad = BadLines()
    problems = list(datasets.iter_problems(cfg.dataset, errors=bad))
    bad.close()
    return problems


def count_problems(cfg: RunConfig) -> int:
    """How many problems the dataset streams (a first pass, for the progress total)."""
    return sum(1 for _ in datasets.iter_problems(cfg.dataset, errors=BadLines(report=False)))


async def run_job(
    cfg: RunConfig, run_dir: Path, *, progress: bool = True, metrics_port: int | None = None
) -> dict:
    """The job over the configured dataset, streamed: never the whole dataset in memory."""
    total = count_problems(cfg)
    bad = BadLines()
    job = Job(cfg, run_dir, progress=progress, metrics_port=metrics_port)
    try:
        return await job.run(datasets.iter_problems(cfg.dataset, errors=bad), total=total)
    finally:
        bad.close()


def fair_outcome(run_dir: Path, failed_problems: Sequence[str]) -> Outcome:
    """A finished ``fair run`` (one process or Ray): where it is and what failed (exit 1)."""
    lines = [f"run directory: {run_dir}"]
    if failed_problems:
        lines.append(
            f"fair: {len(failed_problems)} problems failed (listed in {run_dir}/failures); "
            "run again to retry them"
        )
    return Outcome(run_dir, "done", failed=len(failed_problems), lines=lines)
