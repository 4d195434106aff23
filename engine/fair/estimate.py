"""``fair run --estimate``: a pilot slice through the real path, then the projection.

The pilot is the dataset's first ``--pilot`` problems, run by ``pipeline.Job`` with the run's
cache (the full run resumes from it: nothing is paid twice); ``budget.project`` scales its trace
to the whole dataset. ``engine.scale.estimate`` runs the same pilot as Ray blocks.

The projected wall time is the pilot's, scaled, or the time the endpoints' capacity needs for
the projected calls and tokens, whichever is longer (``at_capacity``). An endpoint's capacity is
its configured ``rpm``/``tpm``; with a key pool, the sum over its keys, each group's keys bounded
together by the group's configured limit, the whole by the endpoint's own limit when set; a key
the pilot saw refused (401/403) counts for nothing. Unset limits (learned at run time) bound
nothing. Dollars do not depend on which key paid.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine.config import EndpointConfig, RunConfig
from fairdistill.engine.fair import datasets
from fairdistill.engine.fair.budget import project, render
from fairdistill.engine.fair.pipeline import Job, count_problems
from fairdistill.engine.inputs import BadLines
from fairdistill.engine.options import Outcome
from fairdistill.engine.rundir.store import iter_raw


async def estimate(cfg: RunConfig, run_dir: Path, pilot: int = 20) -> dict[str, Any]:
    """Run the first ``pilot`` problems, then project the whole dataset from the trace."""
    total = count_problems(cfg)
    bad = BadLines()
    slice_ = list(itertools.islice(datasets.iter_problems(cfg.dataset, errors=bad), pilot))
    bad.close()
    started = time.monotonic()
    await Job(cfg, run_dir, progress=False).run(slice_, total=len(slice_))
    wall = time.monotonic() - started
    covered = sum(1 for _ in iter_raw(run_dir, "problems"))  # a re-estimate reads the same trace
    return at_capacity(cfg, run_dir, project(cfg, run_dir, total, covered or len(slice_), wall))


def refused_keys(run_dir: Path) -> set[tuple[str, str]]:
    """(endpoint, key variable) of the pool keys the trace shows refused (401/403)."""
    return {(t["endpoint"], env) for t in iter_raw(run_dir, "trace") for env in t.get("refused") or ()}


def capacity(ep: EndpointConfig, field: str, retired: AbstractSet[str] = frozenset()) -> float | None:
    """The most ``field`` ("rpm" or "tpm") the endpoint can take: its configured limit, or for
    a key pool the sum over its live keys, each group's keys bounded by the group's limit, the
    whole by the endpoint's; None when unbounded (a limit is not configured, so learned)."""
    own = getattr(ep, field) or math.inf
    if ep.pooled:
        by_group: dict[str, float] = defaultdict(float)
        for k in ep.keys:
            if k.env not in retired:
                by_group[k.group_name] += getattr(k, field) or math.inf
        total = 0.0
        for name, keys_sum in by_group.items():
            group = ep.groups.get(name)
            total += min(keys_sum, (getattr(group, field) if group is not None else None) or math.inf)
        own = min(own, total)
    return None if math.isinf(own) else own


def at_capacity(cfg: RunConfig, run_dir: Path, est: dict[str, Any]) -> dict[str, Any]:
    """``est`` with each endpoint's capacity (``capacity_rpm``, ``capacity_tpm``) and the wall
    time its projected calls and tokens need at it (``wall_s_at_capacity``); ``wall_s_online``
    becomes the longer of the scaled pilot and the slowest endpoint at capacity."""
    refused = refused_keys(run_dir)
    wall = est["wall_s_online"]
    for name, e in est["endpoints"].items():
        ep = cfg.endpoints[name]
        gone = {env for n, env in refused if n == name}
        rpm, tpm = capacity(ep, "rpm", gone), capacity(ep, "tpm", gone)
        need = [e["calls"] / rpm * 60 if rpm else 0.0]
        if tpm:
            need.append((e["prompt_tokens"] + e["completion_tokens"]) / tpm * 60)
        e.update(capacity_rpm=rpm, capacity_tpm=tpm, wall_s_at_capacity=round(max(need), 1))
        if ep.pooled:
            e["keys_refused"] = sorted(gone)
        wall = max(wall, e["wall_s_at_capacity"])
    return {**est, "wall_s_online": round(wall, 1), "wall_s_pilot_scaled": est["wall_s_online"]}


async def estimate_outcome(cfg: RunConfig, run_dir: Path, pilot: int) -> Outcome:
    """``estimate``, written to ``estimate.json`` and said (``finish_run`` prints it)."""
    est = await estimate(cfg, run_dir, pilot=pilot)
    return projection(run_dir, est, f"run directory: {run_dir} (the full run resumes from the pilot)")


def projection(run_dir: Path, est: dict[str, Any], line: str) -> Outcome:
    """Write ``estimate.json``; the projection for stdout and ``line`` for stderr."""
    (run_dir / "estimate.json").write_bytes(msgspec.json.format(msgspec.json.encode(est)))
    return Outcome(run_dir, "pilot", lines=[line], stdout=render(est))
