"""The constants of admission's adaptation (cold start, AIMD, probing), in one frozen value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tunables:
    """The constants of admission's adaptation, in one value (``Admission(..., tune=...)``).
    The defaults were measured against the simulator (``fair bench throughput --regimes shapes``)."""

    max_cut: float = 0.5  # a cut at most halves the rate...
    min_cut: float = 0.9  # ...and takes at least 10 % off
    cut_interval_s: float = 1.0  # at most one cut a second
    cooldown_s: float = 2.0  # no creep until this long after the last cut
    creep_far: float = 0.25  # creep per second while below 85 % of the knee
    creep_near: float = 0.03  # ...near the knee
    creep_past: float = 0.1  # ...past 110 % of it
    min_rate: float = 0.05  # req/s floor of the adaptive rate
    probe_max_s: float = 2.0  # while an endpoint refuses everything, one probe at least this often
    probe_min_s: float = 0.001  # a `Retry-After: 0` (or a negative one, clamped to 0) must not divide by zero
    ramp_step_s: float = 0.25  # after a refusal ends, the pace doubles this often back up to the rate
    ramp_from: int = 16  # ...starting from this fraction of it (1/16: four doublings, 1 s)
    default_pause_s: float = 1.0  # pause after a 429 that carries no Retry-After
    cold_window: int = 32  # cold start: calls sent before an endpoint first answers...
    cold_doubling_s: float = 0.05  # ...then doubling every 50 ms (continuously) until it does


TUNABLES = Tunables()
