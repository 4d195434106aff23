"""Teacher stage: every teacher's own rationale (no gold) and its explanation of each mistake."""

from __future__ import annotations

from fairdistill.engine.fair.answers import grade, states_answer
from fairdistill.engine.fair.errortypes import UNKNOWN, parse_error_type
from fairdistill.engine.fair.stages.context import StageContext
from fairdistill.engine.rundir.schema import Attempt, Feedback, Problem, Rationale
from fairdistill.engine.types import ChatRequest, Message


def rationale_id(problem: Problem, teacher: str) -> str:
    return f"{problem.id}/rationale/{teacher}"


def feedback_id(attempt: Attempt, teacher: str) -> str:
    return f"{attempt.problem_id}/feedback/{teacher}/{attempt.sample_index}"


def _request(ctx: StageContext, messages: tuple[Message, ...], max_tokens: int) -> ChatRequest:
    t = ctx.cfg.teachers
    return ChatRequest(
        messages=messages, max_tokens=max_tokens, temperature=t.temperature, seed=ctx.cfg.run.seed
    )


async def rationale(ctx: StageContext, problem: Problem, teacher: str) -> Rationale:
    """A teacher's step-by-step solution, gold-checked; review fills in scores and verdict."""
    rid = rationale_id(problem, teacher)
    if (prior := ctx.reuse(rid)) is not None:
        return prior  # type: ignore[return-value]
    messages = ctx.prompts.render("solve", problem)
    request = _request(ctx, messages, ctx.cfg.teachers.max_tokens)
    done = await ctx.engine.complete(teacher, request, "rationale", problem.id)
    pred, correct = grade(done.text, problem.answer, problem.task, question=problem.question)
    return Rationale(
        id=rid,
        problem_id=problem.id,
        teacher=teacher,
        text=done.text,
        answer=pred,
        gold_match=correct,  # with gold_check = "off" only recorded (report: judge quality)
        gold_stated=states_answer(done.text, problem.answer, problem.task),
        prompt_version=ctx.version,
        reasoning=done.choices[0].reasoning,  # kept apart: grading and review read only the text
    )


async def feedback(ctx: StageContext, problem: Problem, teacher: str, mistake: Attempt) -> Feedback:
    """A teacher explains one student mistake, with the gold answer as a hint, and tags its type."""
    rid = feedback_id(mistake, teacher)
    if (prior := ctx.reuse(rid)) is not None:
        return prior  # type: ignore[return-value]
    messages = ctx.prompts.render("feedback", problem, student_answer=mistake.text, gold=problem.answer)
    request = _request(ctx, messages, ctx.cfg.teachers.max_tokens)
    done = await ctx.engine.complete(teacher, request, "feedback", problem.id)
    tag = parse_error_type(done.text)
    if tag == UNKNOWN:
        ctx.counts.unknown_error_types += 1
    return Feedback(
        id=rid,
        problem_id=problem.id,
        teacher=teacher,
        attempt_id=mistake.id,
        text=done.text,
        prompt_version=ctx.version,
        error_type=tag,
        reasoning=done.choices[0].reasoning,
    )
