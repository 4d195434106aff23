"""Peer-review scores and the threshold rule.

    parse_score(text)                 -> 1..5 from a reviewer's reply ("... [4]"), or None
    aggregate(scores, how)            -> mean | median | min of valid scores
    verdict(scores, threshold=3.0, min_valid=1, aggregation="mean")
                                      -> accept iff aggregate(valid scores) > threshold;
                                         None with fewer than min_valid valid scores
    decided(received, pending, **rule)-> the verdict if no outcome of the pending reviews can
                                         change it, else None (early stopping)

A valid score is an integer 1-5; anything else (None, 0, 83: what the FAIR release holds for
unparseable or out-of-range reviews) is dropped before aggregating. With the defaults this is
the FAIR paper's rule, and it reproduces its released SVAMP acceptances exactly (826 of 1,161).

Pure Python: the trainer imports this module too.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

MIN_SCORE = 1
MAX_SCORE = 5
AGGREGATIONS = ("mean", "median", "min")

# "[4]", "[ 4 ]", "[4/5]", "[4 / 5]"; any other bracket content is not a score.
_BRACKETED = re.compile(r"\[\s*(-?\d+)\s*(?:/\s*5\s*)?\]")


def parse_score(text: str) -> int | None:
    """The reviewer's score: the last bracketed integer in the text, if it is 1-5.

    Strict on purpose: "[4]" and "[4/5]" count; a bare "4/5", "Score: 4", "[4.5]" or "[8/10]"
    do not, and a last bracketed integer out of range ("[0]", "[83]") gives None rather than an
    earlier bracket being guessed at.
    """
    if not text:
        return None
    found = _BRACKETED.findall(text)
    if not found:
        return None
    score = int(found[-1])
    return score if MIN_SCORE <= score <= MAX_SCORE else None


def is_valid(score: object) -> bool:
    return isinstance(score, int) and not isinstance(score, bool) and MIN_SCORE <= score <= MAX_SCORE


def valid_scores(scores: Sequence[int | None]) -> list[int]:
    """The scores that count: integers 1-5; None and out-of-range values are dropped."""
    return [s for s in scores if is_valid(s)]  # type: ignore[misc]


def aggregate(scores: Sequence[int], how: str = "mean") -> float | None:
    """mean | median | min of the scores; None for no scores."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {how!r}")
    if not scores:
        return None
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "median":
        return float(statistics.median(scores))
    return float(min(scores))


def verdict(
    scores: Sequence[int | None], *, threshold: float = 3.0, min_valid: int = 1, aggregation: str = "mean"
) -> bool | None:
    """Accept iff the aggregate of the valid scores is strictly above ``threshold``.

    None (no verdict) when fewer than ``min_valid`` scores are valid; at least one valid score is
    always needed, whatever ``min_valid`` says, since nothing can be aggregated from none.
    """
    valid = valid_scores(scores)
    if len(valid) < max(min_valid, 1):
        return None
    value = aggregate(valid, aggregation)
    assert value is not None
    return value > threshold


def decided(
    received: Sequence[int | None],
    pending: int,
    *,
    threshold: float = 3.0,
    min_valid: int = 1,
    aggregation: str = "mean",
) -> bool | None:
    """The final verdict if it no longer depends on the ``pending`` reviews, else None.

    Each pending review may end up any score 1-5 or invalid (unparseable, failed: dropped).
    mean, median and min never decrease when one score rises, so for a given number ``k`` of
    pending reviews that turn out valid, every outcome lies between "all k are 1" and "all k are
    5". The verdict is decided when both extremes agree for every k from 0 to ``pending``,
    including k where too few valid scores leave no verdict at all. A verdict that will surely be
    None (``min_valid`` out of reach) is reported as None too: undecided and absent look alike,
    so the caller simply asks the remaining reviewers.
    """
    if pending < 0:
        raise ValueError(f"pending must be >= 0, not {pending}")
    rule = {"threshold": threshold, "min_valid": min_valid, "aggregation": aggregation}
    valid = valid_scores(received)
    outcomes: set[bool | None] = set()
    for k in range(pending + 1):
        outcomes.add(verdict(valid + [MIN_SCORE] * k, **rule))
        outcomes.add(verdict(valid + [MAX_SCORE] * k, **rule))
        if len(outcomes) > 1:
            return None
    (only,) = outcomes
    return only
