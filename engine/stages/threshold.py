"""Gold check and threshold: turn a rationale and its review scores into a verdict."""

from __future__ import annotations

import msgspec

from engine import scoring
from engine.config import ReviewSection
from engine.schema import Rationale, Score


def skips_review(r: Rationale, rule: ReviewSection) -> bool:
    """Under ``reject`` a rationale whose answer misses the gold is never sent to review."""
    return rule.gold_check == "reject" and r.gold_match is False


def judge(r: Rationale, scores: list[Score], rule: ReviewSection) -> Rationale:
    """The rationale with its scores, aggregate and final status."""
    valid = [s.score for s in scores if s.score is not None]
    mean = scoring.aggregate(valid, rule.aggregation) if valid else None
    gold_blocks = rule.gold_check in ("reject", "review-anyway") and r.gold_match is False
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
