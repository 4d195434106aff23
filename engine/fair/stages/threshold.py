"""Gold check and threshold: turn a rationale and its review scores into a verdict."""

from __future__ import annotations

import msgspec

from fairdistill.engine.config import ReviewSection
from fairdistill.engine.fair import scoring
from fairdistill.engine.rundir.schema import Rationale, Score


def skips_review(r: Rationale, rule: ReviewSection) -> bool:
    """Under ``reject`` a rationale whose answer misses the gold is never sent to review."""
    return rule.gold_check == "reject" and r.gold_match is False


def judge(
    r: Rationale, scores: list[Score], rule: ReviewSection, calibration: scoring.Calibration | None = None
) -> Rationale:
    """The rationale with its scores, aggregate and final status (``calibration``: the run's
    reviewer statistics, used when ``aggregation = "calibrated"``)."""
    gold_blocks = rule.gold_check in ("reject", "review-anyway") and r.gold_match is False
    if rule.aggregation == "calibrated":
        verdict, mean = scoring.calibrated_verdict(
            [(s.reviewer, s.score) for s in scores],
            calibration or scoring.Calibration(),
            threshold=rule.threshold,
            min_valid=rule.min_valid,
        )
    else:
        valid = scoring.valid_scores([s.score for s in scores])
        mean = scoring.aggregate(valid, rule.aggregation) if valid else None
        verdict = scoring.verdict(
            [s.score for s in scores],
            threshold=rule.threshold,
            min_valid=rule.min_valid,
            aggregation=rule.aggregation,
        )
    if gold_blocks:
        status = "rejected_gold"
    elif verdict is None:
        status = "no_reviews"
    else:
        status = "accepted" if verdict else "rejected_review"
    return msgspec.structs.replace(
        r, scores=scores, mean_score=mean, accepted=status == "accepted", status=status
    )
