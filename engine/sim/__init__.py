"""The simulator: OpenAI-compatible teachers and students with hidden limits, faults and replay.

    from fairdistill.engine.sim import SimProfile, ModelProfile, start_sim

    async with start_sim("committee", problems) as sim:   # binds 127.0.0.1, a free port
        sim.base_url      # "http://127.0.0.1:PORT/v1"
        sim.stats         # counters: requests, ok, http_429, http_5xx, hangs, resets, ...

``SimThread`` runs one in a background thread for synchronous code; ``fair sim`` runs one as a
standalone server. Profiles: ``engine/sim/profiles/*.toml`` or any TOML file (see profiles.py).
"""

from fairdistill.engine.sim.profiles import (
    Burst,
    Faults,
    ModelProfile,
    SimProfile,
    load_profile,
    named_profiles,
)
from fairdistill.engine.sim.server import SimServer, SimStats, SimThread, start_sim

__all__ = [
    "Burst",
    "Faults",
    "ModelProfile",
    "SimProfile",
    "SimServer",
    "SimStats",
    "SimThread",
    "load_profile",
    "named_profiles",
    "start_sim",
]
