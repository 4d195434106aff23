"""``StageCounts``: the live figures of a FAIR job, one declared field each (progress line,
``/metrics``' ``fair_stage_total``, the job's summary)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

STATUSES = ("accepted", "rejected_gold", "rejected_review", "no_reviews")  # a judged rationale's


@dataclass
class StageCounts:
    """What the stages did in this run (``resumed_done``: problems finished by an earlier run)."""

    attempts: int = 0
    mistakes: int = 0
    feedback: int = 0
    samples: int = 0
    resumed_done: int = 0
    accepted: int = 0
    rejected_gold: int = 0
    rejected_review: int = 0
    no_reviews: int = 0
    review_errors: int = 0
    invalid_scores: int = 0
    reviews_saved: int = 0  # reviews early stopping did not need
    unknown_error_types: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # failed reviews by exception type

    def judged(self, status: str) -> None:
        """Count a judged rationale by its ``status`` (one of ``STATUSES``)."""
        if status == "accepted":
            self.accepted += 1
        elif status == "rejected_gold":
            self.rejected_gold += 1
        elif status == "rejected_review":
            self.rejected_review += 1
        elif status == "no_reviews":
            self.no_reviews += 1
        else:
            raise ValueError(f"unknown rationale status {status!r}")

    def statuses(self) -> dict[str, int]:
        """Judged rationales per status."""
        return dict(
            zip(
                STATUSES,
                (self.accepted, self.rejected_gold, self.rejected_review, self.no_reviews),
                strict=True,
            )
        )

    def as_dict(self) -> dict[str, int]:
        """Plain figures for the summary (``error:<Type>`` per failed review's exception)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "errors"}
        return out | {f"error:{name}": n for name, n in self.errors.items()}
