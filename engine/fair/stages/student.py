"""Student stage: k attempts per problem, graded; the wrong ones are the student's mistakes."""

from __future__ import annotations

import asyncio

from fairdistill.engine.fair.answers import grade
from fairdistill.engine.fair.stages.context import StageContext
from fairdistill.engine.rundir.schema import Attempt, Problem
from fairdistill.engine.types import ChatRequest


def attempt_id(problem: Problem, student: str, k: int) -> str:
    return f"{problem.id}/attempt/{student}/{k}"


async def attempt(ctx: StageContext, problem: Problem, k: int) -> Attempt:
    """One graded attempt; raises RequestError when the student cannot be reached."""
    cfg = ctx.cfg.student
    rid = attempt_id(problem, cfg.endpoint, k)
    if (prior := ctx.reuse(rid)) is not None:
        return prior  # type: ignore[return-value]
    request = ChatRequest(
        messages=ctx.prompts.render("solve", problem),
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=ctx.cfg.run.seed + k,
        sample_index=k,
    )
    done = await ctx.engine.complete(cfg.endpoint, request, "student", problem.id)
    pred, correct = grade(done.text, problem.answer, problem.task, question=problem.question)
    return Attempt(
        id=rid,
        problem_id=problem.id,
        student=cfg.endpoint,
        sample_index=k,
        text=done.text,
        answer=pred,
        correct=correct,
        prompt_version=ctx.version,
        finish_reason=done.choices[0].finish_reason,
        model=ctx.cfg.endpoints[cfg.endpoint].model,
    )


async def attempts(ctx: StageContext, problem: Problem) -> list[Attempt]:
    """All k attempts of a problem, concurrently."""
    return list(await asyncio.gather(*(attempt(ctx, problem, k) for k in range(ctx.cfg.student.attempts))))


def mistakes(done: list[Attempt]) -> list[Attempt]:
    """Wrong attempts, one per distinct text (k identical wrong answers teach nothing new)."""
    seen: set[str] = set()
    out = []
    for a in done:
        if not a.correct and a.text.strip() not in seen:
            seen.add(a.text.strip())
            out.append(a)
    return out
