"""Peer-review scores and the threshold rule.

    parse_score(text)                 -> 1..5 from a reviewer's reply ("... [4]"), or None
    aggregate(scores, how)            -> mean | median | min of valid scores
    verdict(scores, threshold=3.0, min_valid=1, aggregation="mean")
                                      -> accept iff aggregate(valid scores) > threshold;
                                         None with fewer than min_valid valid scores
    decided(received, pending, **rule)-> the verdict if no outcome of the pending reviews can
                                         change it, else None (early stopping)
    Calibration                       -> per-reviewer score statistics; ``value(reviewer, s)``
                                         puts a score on the pooled scale (aggregation
                                         "calibrated": a lenient and a harsh reviewer weigh
                                         the same)
    calibrated_verdicts(items, ...)   -> offline: every item's verdict with each reviewer
                                         standardised against all its scores in the run

A valid score is an integer 1-5; anything else (None, 0, 83: what the FAIR release holds for
unparseable or out-of-range reviews) is dropped before aggregating. With the defaults this is
the FAIR paper's rule, and it reproduces its released SVAMP acceptances exactly (826 of 1,161).

Pure Python: the trainer imports this module too.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence

from fairdistill.engine.config import MAX_SCORE, MIN_SCORE

AGGREGATIONS = ("mean", "median", "min")
PRIOR_WEIGHT = 10.0  # pseudo-scores at the pooled mean/sd before a reviewer's own count
MIN_SD = 0.25  # a reviewer who always gives the same score is not stretched without bound

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
    valid = valid_scores(received)
    outcomes: set[bool | None] = set()
    for k in range(pending + 1):
        for extreme in (MIN_SCORE, MAX_SCORE):
            scores = valid + [extreme] * k
            outcomes.add(verdict(scores, threshold=threshold, min_valid=min_valid, aggregation=aggregation))
        if len(outcomes) > 1:
            return None
    (only,) = outcomes
    return only


# ---------------------------------------------------------------------------------------------
# calibrated aggregation


class Calibration:
    """Running per-reviewer mean and sd; maps a score onto the pooled scale of all reviewers.

    ``value(r, s) = μ + σ · (s - μ_r) / σ_r`` where μ, σ are pooled over every reviewer and
    μ_r, σ_r are reviewer ``r``'s, shrunk towards the pooled ones by ``PRIOR_WEIGHT`` pseudo-scores
    (a reviewer seen a few times is barely moved). Averaging these values and comparing with the
    threshold is the ``calibrated`` rule. In a live run the statistics are those of the scores
    received so far; ``calibrated_verdicts`` uses the whole run's.
    """

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}  # reviewer -> [n, sum, sum of squares]

    def add(self, reviewer: str, score: int | None) -> None:
        if is_valid(score):
            st = self.stats.setdefault(reviewer, [0.0, 0.0, 0.0])
            st[0] += 1
            st[1] += score  # type: ignore[operator]
            st[2] += score * score  # type: ignore[operator]

    def pooled(self) -> tuple[float, float]:
        n = sum(st[0] for st in self.stats.values())
        if n == 0:
            return 3.0, 1.0
        mean = sum(st[1] for st in self.stats.values()) / n
        var = sum(st[2] for st in self.stats.values()) / n - mean * mean
        return mean, max(MIN_SD, math.sqrt(max(0.0, var)))

    def reviewer(self, name: str) -> tuple[float, float]:
        mu, sd = self.pooled()
        n, total, sq = self.stats.get(name, [0.0, 0.0, 0.0])
        k = PRIOR_WEIGHT
        mean = (total + k * mu) / (n + k)
        second = (sq + k * (sd * sd + mu * mu)) / (n + k)
        return mean, max(MIN_SD, math.sqrt(max(0.0, second - mean * mean)))

    def value(self, reviewer: str, score: int) -> float:
        mu, sd = self.pooled()
        mean_r, sd_r = self.reviewer(reviewer)
        return mu + sd * (score - mean_r) / sd_r


def calibrated_verdict(
    scores: Sequence[tuple[str, int | None]], cal: Calibration, *, threshold: float = 3.0, min_valid: int = 1
) -> tuple[bool | None, float | None]:
    """(verdict, calibrated mean) of one item's ``(reviewer, score)`` pairs."""
    values = [cal.value(r, s) for r, s in scores if is_valid(s)]  # type: ignore[arg-type]
    if len(values) < max(min_valid, 1):
        return None, None
    mean = sum(values) / len(values)
    return mean > threshold, mean


def calibrated_verdicts(
    items: Sequence[Sequence[tuple[str, int | None]]], *, threshold: float = 3.0, min_valid: int = 1
) -> list[bool | None]:
    """Each item's calibrated verdict, every reviewer standardised against all its scores."""
    cal = Calibration()
    for item in items:
        for reviewer, score in item:
            cal.add(reviewer, score)
    return [calibrated_verdict(item, cal, threshold=threshold, min_valid=min_valid)[0] for item in items]
