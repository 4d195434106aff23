"""The FAIR job as a streaming per-problem DAG (DESIGN.md section 1).

Each problem runs on its own: student attempts → grading → for every teacher, concurrently, a
rationale (→ gold check → peer review → threshold) and an explanation of each mistake →
samples. Nothing waits for a phase to end, so the review of problem 1 overlaps the generation
of problem 900; at most ``run.max_in_flight`` problems are held in memory.

Resume: a problem is finished once its ``problems`` record is written (last). Records of
unfinished problems are reloaded and reused, and every completed call is in the cache, so a
re-run after SIGKILL pays nothing twice and writes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from pathlib import Path

from engine import datasets
from engine.client import Engine
from engine.config import RunConfig, dump_config, load_config
from engine.errors import BreakerTripped, InputError, RequestError
from engine.prompts import prompt_set
from engine.report import write_report
from engine.schema import Attempt, Failure, Feedback, Problem, ProblemDone, Rationale, Score
from engine.stages import review as review_stage
from engine.stages import samples as samples_stage
from engine.stages import student, teachers
from engine.stages.context import StageContext
from engine.stages.threshold import judge, skips_review
from engine.store import RunStore, iter_records

KINDS = ["attempts", "rationales", "feedback", "reviews", "samples", "failures", "problems"]
REUSED_KINDS = ["attempts", "rationales", "feedback", "reviews"]


class Job:
    """One ``fair run``: owns the store, the engine and the per-problem tasks."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True, writer: str = ""):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.store = RunStore(self.run_dir, writer=writer, shard_records=cfg.run.shard_records)
        self.progress = progress
        self.recent: collections.deque[bool] = collections.deque(maxlen=cfg.run.breaker_window)
        self.failed_problems: list[str] = []
        self.ctx: StageContext | None = None
        self.total = 0
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
        r = judge(r, scores, rule)
        self.store.write("rationales", r)
        ctx.counts[r.status] += 1
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
        ctx.counts["feedback"] += 1
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
        ctx.counts["attempts"] += len(attempts)
        ctx.counts["mistakes"] += len(wrong)
        if not wrong:
            self.store.write(
                "problems",
                ProblemDone(id=problem.id, status="correct", dataset=problem.dataset, attempts=len(attempts)),
            )
            return True

        names = self.cfg.teachers.endpoints
        rationale_tasks = [self._rationale_path(ctx, problem, t) for t in names]
        feedback_tasks = [self._feedback_path(ctx, problem, t, m) for m in wrong for t in names]
        results = await asyncio.gather(*rationale_tasks, *feedback_tasks)
        rationales = [r for r in results[: len(names)] if r is not None]
        fb = results[len(names) :]
        if any(x is None for x in results):
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
        ctx.counts["samples"] += len(made)
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
    def _load_prior(self, done: set[str]) -> dict:
        """Records of problems an interrupted run started but did not finish."""
        prior = {}
        for kind in REUSED_KINDS:
            for rec in iter_records(self.run_dir, kind):
                if rec.problem_id not in done:
                    prior[rec.id] = rec
        return prior

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

    async def run(self, problems: list[Problem]) -> dict:
        self.store.open(KINDS)
        (self.run_dir / "config.toml").write_bytes(dump_config(self.cfg))
        done = self.store.ids("problems")
        todo = [p for p in problems if p.id not in done]
        self.total = len(problems)
        status = "interrupted"
        async with Engine(
            self.cfg.endpoints, cache_path=self.run_dir / "cache.sqlite", trace_dir=self.run_dir / "trace"
        ) as engine:
            self.ctx = StageContext(
                engine=engine,
                cfg=self.cfg,
                prompts=prompt_set(self.cfg.prompts),
                prior=self._load_prior(done),
            )
            self.ctx.counts["resumed_done"] = len(done) if todo else 0
            ticker = asyncio.create_task(self._ticker(engine)) if self.progress else None
            slots = asyncio.Semaphore(self.cfg.run.max_in_flight)

            async def one(p: Problem) -> None:
                try:
                    self._record_outcome(p, await self.process(p))
                finally:
                    slots.release()

            try:
                async with asyncio.TaskGroup() as tg:
                    for p in todo:
                        await slots.acquire()
                        tg.create_task(one(p))
                status = "done" if not self.failed_problems else "done_with_failures"
            except* Exception as eg:
                status = "aborted"
                raise eg.exceptions[0] from None
            finally:
                if ticker:
                    ticker.cancel()
                    self._print_progress(engine, final=True)
                self.store.close(status, {"problems_total": self.total, "endpoints": engine.snapshot()})
        write_report(self.run_dir)
        return {"status": status, "failed_problems": self.failed_problems, "counts": dict(self.ctx.counts)}

    # -- progress -------------------------------------------------------------------------
    async def _ticker(self, engine: Engine) -> None:
        interval = 0.5 if sys.stderr.isatty() else 10.0
        while True:
            await asyncio.sleep(interval)
            self._print_progress(engine)

    def _print_progress(self, engine: Engine, final: bool = False) -> None:
        assert self.ctx is not None
        c = self.ctx.counts
        done = self.store.count("problems")
        elapsed = time.monotonic() - self.started
        st = engine.snapshot()
        calls = sum(s["requests"] - s["cache_hits"] for s in st.values())  # as report.md counts them
        toks = sum(s["prompt_tokens"] + s["completion_tokens"] for s in st.values())
        cost = sum(s["cost_usd"] for s in st.values())
        rate = (done - c["resumed_done"]) / elapsed if elapsed > 0 else 0
        left = self.total - done
        eta = f"{left / rate:,.0f}s" if rate > 0 and not final else "-"
        line = (
            f"problems {done}/{self.total} | mistakes {c['mistakes']} | rationales ok {c['accepted']} "
            f"gold✗ {c['rejected_gold']} review✗ {c['rejected_review']} "
            f"| calls {calls} ({calls / elapsed:,.1f}/s) "
            f"tok {toks:,} | ${cost:,.4f} | 429 {sum(s['http_429'] for s in st.values())} "
            f"retries {sum(s['retries'] for s in st.values())} | eta {eta}"
        )
        end = "\n" if final or not sys.stderr.isatty() else ""
        print(("\r" if sys.stderr.isatty() else "") + line, end=end, file=sys.stderr, flush=True)


def load_problems(cfg: RunConfig) -> list[Problem]:
    """The dataset, with bad lines reported (file:line) and skipped."""
    errors: list[InputError] = []
    problems = datasets.load_problems(cfg.dataset, errors=errors)
    for e in errors[:20]:
        print(f"fair: skipped input: {e}", file=sys.stderr)
    if len(errors) > 20:
        print(f"fair: ... and {len(errors) - 20} more bad input lines", file=sys.stderr)
    return problems


async def run_job(cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> dict:
    return await Job(cfg, run_dir, progress=progress).run(load_problems(cfg))


def cli_main(args) -> int:
    cfg = load_config(args.config)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    summary = asyncio.run(run_job(cfg, run_dir, progress=not args.no_progress))
    print(f"run directory: {run_dir}", file=sys.stderr)
    if summary["failed_problems"]:
        print(
            f"fair: {len(summary['failed_problems'])} problems failed (listed in {run_dir}/failures); "
            "run again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0
