"""The one way a skipped input line is reported, for every reader of user input.

``fair run`` (a dataset's problems), ``fair generate`` (prompt lines), the Ray plan and the
Batch API feed all skip a bad line and go on; they report it through ``BadLines``: the first
``MAX_REPORTED`` as ``fair: skipped input line: FILE:LINE: why`` on stderr, the rest counted,
never kept (memory stays flat over any number of bad lines).
"""

from __future__ import annotations

import sys
from typing import Protocol

from fairdistill.engine.errors import InputError, one_line

MAX_REPORTED = 20  # lines named one by one (per reporter); failures listed in a summary, too


class ErrorSink(Protocol):
    """Where a reader puts the bad lines it skips (a ``list``, or a ``BadLines``)."""

    def append(self, err: InputError, /) -> None: ...


class BadLines:
    """The ``errors`` sink of a reader (``datasets.iter_problems``, the generate input): prints
    the first bad lines as they are met and keeps only a count. ``report=False``: a second pass
    over the same input (it was reported on the first)."""

    def __init__(self, report: bool = True, limit: int = MAX_REPORTED):
        self.count = 0
        self.report = report
        self.limit = limit

    def append(self, err: InputError) -> None:
        """A bad line (``InputError`` naming ``file:line`` and why)."""
        self.skip(str(err))

    def skip(self, why: str) -> None:
        """A line skipped for another reason (``file:line: duplicate id ...``)."""
        self.count += 1
        if self.report and self.count <= self.limit:
            print(f"fair: skipped input line: {one_line(why)}", file=sys.stderr)

    def close(self) -> None:
        """Say how many more were skipped than were named."""
        if self.report and self.count > self.limit:
            print(f"fair: ... and {self.count - self.limit} more bad input lines", file=sys.stderr)
