"""Training samples: rationale-learning from accepted rationales, mistake-learning from explanations.

Policy ``paper`` (docs/architecture.md): a problem with no accepted rationale gives no samples;
otherwise one accepted rationale and one explanation per mistake, picked at random with a
generator seeded by (run seed, problem id), so the pick never depends on completion order.
Policy ``all``: every accepted rationale and every explanation, whatever was accepted.

With ``samples.answer_line`` an accepted rationale that has no explicit answer statement (strict
extraction finds none: the FAIR release texts, free-form teachers) gets "The answer is X."
appended, X its gold-checked final answer, so the student learns to state one; the sample
records that it was added. Explanations lose their error-type tag line (the tag is kept on the
sample as the majority of the teachers' tags).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable

from fairdistill.engine.fair.answers import extract_answer
from fairdistill.engine.fair.errortypes import majority, strip_tag
from fairdistill.engine.fair.stages.context import StageContext
from fairdistill.engine.rundir.schema import Attempt, Feedback, Msg, Problem, Rationale, Sample, Score


def _rng(seed: int, problem_id: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{problem_id}".encode()))


def _msgs(messages: Iterable[Msg]) -> list[Msg]:
    return [Msg(m.role, m.content) for m in messages]


def with_answer_line(text: str, answer: str | None, problem: Problem) -> tuple[str, bool]:
    """``text`` ending in an answer statement; (text, whether one was appended)."""
    if answer is None or extract_answer(text, problem.task, mode="strict", options=problem.options):
        return text, False
    return f"{text.rstrip()}\nThe answer is {answer}.", True


def build(
    ctx: StageContext,
    problem: Problem,
    accepted: list[Rationale],
    explanations: dict[str, list[Feedback]],  # attempt id -> accepted explanations of that mistake
    mistakes: list[Attempt],
    feedback_scores: dict[str, list[Score]] | None = None,
) -> list[Sample]:
    rng = _rng(ctx.cfg.run.seed, problem.id)
    paper = ctx.cfg.samples.policy == "paper"
    if paper and not accepted:
        return []
    out: list[Sample] = []
    chosen = [rng.choice(accepted)] if paper else accepted
    solve = _msgs(ctx.prompts.render("solve", problem))
    for r in chosen:
        response, added = r.text, False
        if ctx.cfg.samples.answer_line:
            # the gold-checked answer; with gold check off, the rationale's own final answer
            response, added = with_answer_line(r.text, r.answer, problem)
        out.append(
            Sample(
                id=f"{problem.id}/sample/rationale/{r.teacher}",
                problem_id=problem.id,
                task="rationale",
                messages=solve,
                response=response,
                teacher=r.teacher,
                scores=r.scores,
                source_id=r.id,
                prompt_version=ctx.version,
                answer_line_added=added,
                reasoning=r.reasoning,
            )
        )
    for m in mistakes:
        pool = explanations.get(m.id, [])
        picked = [rng.choice(pool)] if paper and pool else pool
        prompt = _msgs(ctx.prompts.render("mistake", problem, student_answer=m.text, gold=problem.answer))
        tag = majority(f.error_type or "" for f in pool)
        for f in picked:
            out.append(
                Sample(
                    id=f"{problem.id}/sample/mistake/{f.teacher}/{m.sample_index}",
                    problem_id=problem.id,
                    task="mistake",
                    messages=prompt,
                    response=strip_tag(f.text),
                    teacher=f.teacher,
                    scores=(feedback_scores or {}).get(f.id, []),
                    source_id=f.id,
                    prompt_version=ctx.version,
                    error_type=tag,
                    reasoning=f.reasoning,
                )
            )
    return out
