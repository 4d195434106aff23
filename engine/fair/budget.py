"""A hard spending cap (``run.max_cost_usd``) and the cost estimate before a run (``--estimate``).

``Budget`` decides, before each new problem, whether it may start: spent (this run's calls plus
what earlier runs of the same run directory spent, from the manifest) + committed (the problems
in flight, each at the projected cost of a problem) + the projected cost of the new one must stay
within the cap. The projection is the mean cost of the problems finished so far in this run; until
one has finished, at most ``PROBE`` problems run at once. At the cap the job stops admitting,
finishes what is in flight, writes the manifest as ``budget`` and exits 3; run it again with a
higher cap to go on. It can overshoot by the in-flight problems' cost only.

``engine.fair.estimate`` runs a pilot slice through the real path and cache (the full run resumes from it, so
the pilot is not paid twice) and projects calls, tokens, dollars and wall time per endpoint and per
stage (student, rationale, feedback, review) to the whole dataset, online and in batch mode, from
the run directory's trace.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fairdistill.engine.errors import AbortRun
from fairdistill.engine.request.pricing import Prices
from fairdistill.engine.rundir.store import iter_raw, read_manifest

if TYPE_CHECKING:
    from fairdistill.engine.config import RunConfig
    from fairdistill.engine.request.client import Engine

PROBE = 4  # problems at once until the first has finished and a cost per problem is known


class BudgetReached(AbortRun):
    """The cap is reached: the run stopped admitting problems (exit 3, resumable)."""


def spent_before(run_dir: Path) -> float:
    """Dollars earlier runs of this directory spent (their manifest's running total)."""
    try:
        manifest = read_manifest(run_dir) or {}
    except Exception:  # a damaged manifest is reported by the store; here it only means "unknown"
        return 0.0
    budget = manifest.get("budget")
    if isinstance(budget, dict) and isinstance(budget.get("spent_usd"), int | float):
        return float(budget["spent_usd"])
    return 0.0


class BudgetGate(Protocol):
    """What ``pipeline.Job`` asks before each problem: ``Budget`` here, ``SharedBudget`` (the
    cluster's ledger) in a Ray worker."""

    stopped: bool

    @property
    def cap(self) -> float | None: ...

    def spent(self, engine: Engine) -> float: ...

    def admit(self, engine: Engine, finished: int, in_flight: int) -> bool: ...

    def fields(self, engine: Engine) -> dict[str, Any]: ...


class Budget:
    """``cap_usd`` None: no cap, only the running total is kept (for a later capped resume)."""

    def __init__(self, cap_usd: float | None, prior_usd: float = 0.0):
        self.cap = cap_usd
        self.prior = prior_usd
        self.stopped = False

    def __repr__(self) -> str:
        return f"Budget(cap={self.cap}, prior={self.prior:.4f}, stopped={self.stopped})"

    def spent(self, engine: Engine) -> float:
        return self.prior + sum(s.cost_usd for s in engine.stats.values())

    def admit(self, engine: Engine, finished: int, in_flight: int) -> bool:
        """May one more problem start now?"""
        if self.cap is None:
            return True
        spent = self.spent(engine)
        if spent >= self.cap:
            self.stopped = True
            return False
        if finished == 0:
            ok = in_flight < PROBE
        else:
            per_problem = (spent - self.prior) / (finished + 0.5 * in_flight)
            ok = spent + per_problem * (0.5 * in_flight + 1) <= self.cap
        self.stopped = not ok and (in_flight == 0 or finished > 0)
        return ok

    def fields(self, engine: Engine) -> dict[str, Any]:
        return {"budget": {"cap_usd": self.cap, "spent_usd": round(self.spent(engine), 6)}}


# -- the estimate -----------------------------------------------------------------------------


def project(cfg: RunConfig, run_dir: Path, total: int, pilot: int, wall_s: float) -> dict[str, Any]:
    """Per endpoint and per stage (the trace's ``stage``): the pilot's calls and tokens (cache hits
    included: a re-estimate reads the same trace), scaled by ``total / pilot``, priced online and
    in batch mode."""
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_stage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for t in iter_raw(run_dir, "trace"):
        ep = cfg.endpoints.get(t["endpoint"])
        if ep is None:
            continue
        p_in, p_out = t.get("prompt_tokens", 0), t.get("completion_tokens", 0)
        cached, written = t.get("cached_tokens", 0), t.get("cache_write_tokens", 0)
        online = Prices.of(ep).cost(p_in, p_out, cached, written)  # as billed: cache reads priced apart
        factor = ep.batch.price_factor if ep.provider in ("openai", "anthropic", "gemini") else 1.0
        for e in (per[t["endpoint"]], by_stage[t.get("stage") or "other"]):
            e["calls"] += 1
            e["prompt_tokens"] += p_in
            e["completion_tokens"] += p_out
            e["reasoning_tokens"] += t.get("reasoning_tokens", 0)
            e["cached_tokens"] += cached
            e["usd_online"] += online
            e["usd_batch"] += online * factor
            e["usd_configured"] += online * factor if ep.mode == "batch" else online
    scale = total / pilot if pilot else 0.0

    def scaled(e: dict[str, float]) -> dict[str, Any]:
        return {
            "calls": round(e["calls"] * scale),
            "prompt_tokens": round(e["prompt_tokens"] * scale),
            "completion_tokens": round(e["completion_tokens"] * scale),
            "reasoning_tokens": round(e["reasoning_tokens"] * scale),  # part of completion_tokens
            "cached_tokens": round(e["cached_tokens"] * scale),  # part of prompt_tokens
            "usd_online": round(e["usd_online"] * scale, 4),
            "usd_batch": round(e["usd_batch"] * scale, 4),
        }

    endpoints = {name: {**scaled(e), "mode": cfg.endpoints[name].mode} for name, e in per.items()}
    stages = {
        name: {**scaled(e), "usd_as_configured": round(e["usd_configured"] * scale, 4)}
        for name, e in sorted(by_stage.items())
    }
    rationales = list(iter_raw(run_dir, "rationales"))
    accepted = sum(1 for r in rationales if r.get("status") == "accepted")
    usd_online = sum(v["usd_online"] for v in endpoints.values())
    usd_batch = sum(v["usd_batch"] for v in endpoints.values())
    return {
        "problems": total,
        "pilot": pilot,
        "endpoints": endpoints,
        "stages": stages,
        "usd_online": round(usd_online, 4),
        "usd_batch": round(usd_batch, 4),
        "usd_as_configured": round(
            sum(v["usd_batch"] if v["mode"] == "batch" else v["usd_online"] for v in endpoints.values()), 4
        ),
        "acceptance_rate": round(accepted / len(rationales), 3) if rationales else None,
        "wall_s_online": round(wall_s * scale, 1),
    }


def render(est: dict[str, Any]) -> str:
    lines = [
        f"estimate for {est['problems']} problems from a pilot of {est['pilot']}"
        f" (acceptance rate {est['acceptance_rate']}):",
        f"{'endpoint':<16}{'mode':<8}{'calls':>10}{'tokens in':>14}{'tokens out':>14}"
        f"{'$ online':>12}{'$ batch':>12}",
    ]
    for name, v in est["endpoints"].items():
        lines.append(
            f"{name:<16}{v['mode']:<8}{v['calls']:>10}{v['prompt_tokens']:>14}{v['completion_tokens']:>14}"
            f"{v['usd_online']:>12.4f}{v['usd_batch']:>12.4f}"
        )
    lines.append(
        f"{'stage':<16}{'':<8}{'calls':>10}{'tokens in':>14}{'tokens out':>14}{'$ online':>12}{'$ batch':>12}"
        f"{'$ configured':>14}"
    )
    for name, v in est.get("stages", {}).items():
        lines.append(
            f"{name:<16}{'':<8}{v['calls']:>10}{v['prompt_tokens']:>14}{v['completion_tokens']:>14}"
            f"{v['usd_online']:>12.4f}{v['usd_batch']:>12.4f}{v['usd_as_configured']:>14.4f}"
        )
    lines.append(
        f"total: ${est['usd_online']:.4f} online, ${est['usd_batch']:.4f} all batch, "
        f"${est['usd_as_configured']:.4f} as configured; ~{est['wall_s_online']:.0f}s of wall time online "
        "(batch mode: up to 24 h per batch round)"
    )
    return "\n".join(lines)
