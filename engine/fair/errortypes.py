"""The student's error type, as the teacher who explains a mistake names it.

    TYPES                      -> the fixed taxonomy (tags the feedback prompt offers)
    INSTRUCTION                -> the sentence the feedback prompt asks for the tag with
    parse_error_type(text)     -> a TYPES tag, or "unknown" when none is given
    strip_tag(text)            -> the explanation without its tag line (the training target)
    majority(tags)             -> the most common known tag (ties: taxonomy order), or "unknown"

A tag is parsed like a review score: the first bracketed tag of the taxonomy, e.g.
"[arithmetic]"; anything else is ``unknown`` and counted as such. Pure Python.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

TYPES = ("misread", "wrong-plan", "arithmetic", "incomplete", "format", "other")
UNKNOWN = "unknown"
DESCRIPTIONS = {
    "misread": "misread the question",
    "wrong-plan": "wrong operation or plan",
    "arithmetic": "arithmetic slip",
    "incomplete": "incomplete reasoning",
    "format": "answer format",
    "other": "other",
}
INSTRUCTION = (
    "Begin your reply with the student's error type in square brackets, one of: "
    + ", ".join(f"[{t}] ({DESCRIPTIONS[t]})" for t in TYPES)
    + "."
)
_TAG = re.compile(r"\[\s*(" + "|".join(re.escape(t) for t in TYPES) + r")\s*\]", re.I)
_TAG_LINE = re.compile(r"^\W*(?:error\s*type\W*)?\[\s*(?:" + "|".join(TYPES) + r")\s*\]\W*$", re.I)


def parse_error_type(text: str | None) -> str:
    """The first bracketed taxonomy tag in the text, lower-cased; ``unknown`` if none."""
    m = _TAG.search(text or "")
    return m.group(1).lower() if m else UNKNOWN


def strip_tag(text: str) -> str:
    """The explanation without a line that holds only the tag (leading or trailing)."""
    lines = text.split("\n")
    kept = [ln for ln in lines if not _TAG_LINE.match(ln.strip())]
    if len(kept) == len(lines):  # tag inline at the very start: "[arithmetic] The student ..."
        return _TAG.sub("", text, count=1).lstrip() if _TAG.match(text.lstrip()) else text
    return "\n".join(kept).strip("\n")


def majority(tags: Iterable[str]) -> str:
    """The commonest known tag; ties go to the earlier taxonomy entry; none known -> unknown."""
    counts = Counter(t for t in tags if t in TYPES)
    if not counts:
        return UNKNOWN
    top = max(counts.values())
    return next(t for t in TYPES if counts.get(t) == top)
