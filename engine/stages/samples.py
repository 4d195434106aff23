"""Training samples: rationale-learning from accepted rationales, mistake-learning from explanations.

Policy ``paper``: one accepted rationale and one explanation per mistake, picked at random with
a generator seeded by (run seed, problem id) — the pick never depends on completion order.
Policy ``all``: every accepted rationale and every explanation.
"""

from __future__ import annotations

import random
import zlib

from engine.schema import Attempt, Feedback, Msg, Problem, Rationale, Sample, Score
from engine.stages.context import StageContext


def _rng(seed: int, problem_id: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{problem_id}".encode()))


def _msgs(messages) -> list[Msg]:
    return [Msg(m.role, m.content) for m in messages]


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
    out: list[Sample] = []
    chosen = [rng.choice(accepted)] if paper and accepted else accepted
    solve = _msgs(ctx.prompts.render("solve", problem))
    for r in chosen:
        out.append(
            Sample(
                id=f"{problem.id}/sample/rationale/{r.teacher}",
                problem_id=problem.id,
                task="rationale",
                messages=solve,
                response=r.text,
                teacher=r.teacher,
                scores=r.scores,
                source_id=r.id,
                prompt_version=ctx.version,
            )
        )
    for m in mistakes:
        pool = explanations.get(m.id, [])
        picked = [rng.choice(pool)] if paper and pool else pool
        prompt = _msgs(ctx.prompts.render("mistake", problem, student_answer=m.text))
        for f in picked:
            out.append(
                Sample(
                    id=f"{problem.id}/sample/mistake/{f.teacher}/{m.sample_index}",
                    problem_id=problem.id,
                    task="mistake",
                    messages=prompt,
                    response=f.text,
                    teacher=f.teacher,
                    scores=(feedback_scores or {}).get(f.id, []),
                    source_id=f.id,
                    prompt_version=ctx.version,
                )
            )
    return out
