"""``run.max_cost_usd`` on Ray: one ledger for the whole cluster, the single-process rule on it.

``engine.fair.budget.Budget`` admits a problem when spent + committed (the problems in flight,
each at the projected cost of a problem) + the projected cost of the new one stay within the cap.
On Ray the terms are global: the ``Ledger`` (kept in the limiter actor, one per run) adds up what
every block attempt (writer) has spent and finished, and grants problems one at a time, so two
workers never both take the last room under the cap. ``SharedBudget`` is what a worker's
``pipeline.Job`` is given instead of its own ``Budget`` (``Job(budget=...)``): its ``admit`` asks
the ledger (one actor round trip per problem, about a millisecond) and says no until it has
answered.

At the cap the ledger's answer is ``stop`` for every worker from then on: each block stops
admitting, finishes what is in flight and ends with status ``budget``; the driver hands out no new
block, writes the manifest as ``budget`` and exits 3. Run it again with a higher cap: blocks done
are skipped, the others adopt their complete records (nothing is paid twice). The ledger reads
what earlier attempts spent from their manifests (``blocks/<block>.e<epoch>.json``) when it is
built, so a resumed run, or a limiter Ray restarted, counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import ray

from fairdistill.engine.fair.budget import PROBE

if TYPE_CHECKING:
    from fairdistill.engine.request.client import Engine

ASK_EVERY_S = 0.05  # a worker told to wait asks again no sooner than this


def attempt_costs(run_dir: Path) -> dict[str, float]:
    """Dollars per block attempt (writer), from the attempt manifests' endpoint counters."""
    out: dict[str, float] = {}
    for path in (Path(run_dir) / "blocks").glob("b*.e*.json"):
        with contextlib.suppress(orjson.JSONDecodeError, OSError, AttributeError, TypeError):
            endpoints = orjson.loads(path.read_bytes()).get("endpoints") or {}
            out[path.name.removesuffix(".json")] = sum(
                float(s.get("cost_usd") or 0.0) for s in endpoints.values() if isinstance(s, dict)
            )
    return out


class Ledger:
    """Spent, finished and granted problems per block attempt; ``reserve`` is ``Budget.admit``
    over all of them."""

    def __init__(self, cap_usd: float, run_dir: Path | None):
        self.cap = cap_usd
        self.spent = attempt_costs(run_dir) if run_dir is not None else {}
        self.prior = sum(self.spent.values())  # before this run (or this limiter incarnation)
        self.finished: dict[str, int] = {}
        self.granted: dict[str, int] = {}
        self.stopped = False

    def total(self) -> float:
        return sum(self.spent.values())

    def report(self, writer: str, spent: float, finished: int) -> None:
        """An attempt's running totals (its own calls' cost, problems finished)."""
        self.spent[writer] = max(self.spent.get(writer, 0.0), spent)
        self.finished[writer] = max(self.finished.get(writer, 0), finished)

    def reserve(self, writer: str, spent: float, finished: int) -> tuple[str, float]:
        """May ``writer`` start one more problem? ``go`` (counted in flight from now), ``wait``
        (the first problems are establishing a cost per problem) or ``stop`` (the cap: for good);
        with the total spent."""
        self.report(writer, spent, finished)
        total = self.total()
        if self.stopped or total >= self.cap:
            self.stopped = True
            return "stop", total
        done = sum(self.finished.values())
        in_flight = sum(max(0, n - self.finished.get(w, 0)) for w, n in self.granted.items())
        if done == 0:
            ok = in_flight < PROBE
        else:
            per_problem = (total - self.prior) / (done + 0.5 * in_flight)
            ok = total + per_problem * (0.5 * in_flight + 1) <= self.cap
        if ok:
            self.granted[writer] = self.granted.get(writer, 0) + 1
            return "go", total
        self.stopped = in_flight == 0 or done > 0
        return ("stop" if self.stopped else "wait"), total


class SharedBudget:
    """``Budget``'s interface for ``pipeline.Job`` in a worker, backed by the ``Ledger``."""

    def __init__(self, limiter: Any, writer: str, cap_usd: float):
        self.limiter = limiter
        self.writer = writer
        self.cap = cap_usd
        self.stopped = False
        self.total = 0.0  # the cluster's spend at the ledger's last answer
        self._granted = 0
        self._asking: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SharedBudget({self.writer!r}, cap={self.cap}, stopped={self.stopped})"

    @staticmethod
    def mine(engine: Engine) -> float:
        return sum(s.cost_usd for s in engine.stats.values())

    def spent(self, engine: Engine) -> float:
        return max(self.total, self.mine(engine))

    def admit(self, engine: Engine, finished: int, in_flight: int) -> bool:
        """True once the ledger granted a problem; until then False (``Job`` asks again)."""
        if self._granted:
            self._granted -= 1
            return True
        if not self.stopped and (self._asking is None or self._asking.done()):
            self._asking = asyncio.ensure_future(self._ask(self.mine(engine), finished))
        return False

    async def _ask(self, spent: float, finished: int) -> None:
        try:
            verdict, self.total = await self.limiter.reserve.remote(self.writer, spent, finished)
        except ray.exceptions.RayError:  # the limiter is restarting: ask again (it rereads the ledger)
            verdict = "wait"
        if verdict == "go":
            self._granted += 1
        elif verdict == "stop":
            self.stopped = True
        else:
            await asyncio.sleep(ASK_EVERY_S)

    def fields(self, engine: Engine) -> dict[str, Any]:
        """The attempt manifest's: this attempt's own spend (the driver sums the attempts)."""
        return {"budget": {"cap_usd": self.cap, "spent_usd": round(self.mine(engine), 6)}}
