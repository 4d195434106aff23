"""Peer review: every teacher but the author scores a text 1-5; stop once the verdict is fixed.

Reviewers are asked one after another, in an order rotated per text so load spreads evenly over
the committee. After each score ``scoring.decided`` says whether any outcome of the remaining
reviews could still change the verdict; if none could, the rest are never requested. The
accepted set is therefore exactly the one exhaustive review would give.
"""

from __future__ import annotations

import zlib

from fairdistill.engine.errors import RequestError
from fairdistill.engine.fair import scoring
from fairdistill.engine.fair.stages.context import StageContext
from fairdistill.engine.rundir.schema import Attempt, Problem, Review, Score
from fairdistill.engine.types import ChatRequest, Message


def reviewers_for(ctx: StageContext, author: str, target_id: str) -> list[str]:
    """The other teachers, rotated by a stable hash of the reviewed text's id."""
    others = [t for t in ctx.cfg.teachers.endpoints if t != author]
    shift = zlib.crc32(target_id.encode()) % len(others)
    return others[shift:] + others[:shift]


def rule_kwargs(ctx: StageContext) -> dict:
    r = ctx.cfg.review
    return {"threshold": r.threshold, "min_valid": r.min_valid, "aggregation": r.aggregation}


async def _one(
    ctx: StageContext,
    problem: Problem,
    target_id: str,
    author: str,
    reviewer: str,
    messages: tuple[Message, ...],
) -> Review | None:
    rid = f"{target_id}/review/{reviewer}"
    if (prior := ctx.reuse(rid)) is not None:
        return prior  # type: ignore[return-value]
    request = ChatRequest(
        messages=messages,
        max_tokens=ctx.cfg.teachers.review_max_tokens,
        temperature=ctx.cfg.teachers.temperature,
        seed=ctx.cfg.run.seed,
    )
    try:
        done = await ctx.engine.complete(reviewer, request, "review", problem.id)
    except RequestError as exc:
        ctx.counts.review_errors += 1
        ctx.counts.errors[type(exc).__name__] += 1
        return None  # a missing review counts as no valid score; the run goes on
    score = scoring.parse_score(done.text)
    if score is None:
        ctx.counts.invalid_scores += 1
    return Review(
        id=rid,
        problem_id=problem.id,
        target_id=target_id,
        author=author,
        reviewer=reviewer,
        text=done.text,
        score=score,
        prompt_version=ctx.version,
        reasoning=done.choices[0].reasoning,
    )


async def review(
    ctx: StageContext,
    problem: Problem,
    target_id: str,
    author: str,
    solution: str,
    *,
    mistake: Attempt | None = None,
    early_stop: bool | None = None,
) -> tuple[list[Review], list[Score]]:
    """Collect reviews of one text (a rationale, or with ``mistake`` an explanation of it)."""
    # the gold reaches the reviewer only where the template has the paper's hint line
    if mistake is None:
        messages = ctx.prompts.render("review", problem, solution=solution, gold=problem.answer)
    else:
        messages = ctx.prompts.render(
            "review_feedback", problem, solution=solution, student_answer=mistake.text, gold=problem.answer
        )
    early = ctx.cfg.review.early_stop if early_stop is None else early_stop
    if ctx.cfg.review.aggregation == "calibrated":
        early = False  # calibrated scores are not bounded by 1-5: ask every reviewer
    order = reviewers_for(ctx, author, target_id)
    reviews: list[Review] = []
    scores: list[Score] = []
    for i, reviewer in enumerate(order):
        if (
            early
            and scoring.decided([s.score for s in scores], len(order) - i, **rule_kwargs(ctx)) is not None
        ):
            ctx.counts.reviews_saved += len(order) - i
            break
        r = await _one(ctx, problem, target_id, author, reviewer, messages)
        if r is not None:
            reviews.append(r)
            ctx.calibration.add(reviewer, r.score)
        scores.append(Score(reviewer, r.score if r is not None else None))
    return reviews, scores
