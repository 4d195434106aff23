"""``finish_run``: the one end of a run, whatever mode ran it."""

from __future__ import annotations

import sys

from fairdistill.engine.options import Outcome


def finish_run(outcome: Outcome) -> int:
    """Raise the run's error (exit 2 or 3 by its type, in ``engine.cli``), print the projection
    to stdout and the summary lines to stderr; the exit code: 1 when records failed, else 0."""
    if outcome.error is not None:
        raise outcome.error
    if outcome.stdout:
        print(outcome.stdout)
    for line in outcome.lines:
        print(line, file=sys.stderr)
    return 1 if outcome.failed else 0
