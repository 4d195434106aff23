"""Scale-out on Ray: the same job, config and run directory from one process to a cluster.

``fair generate ... --ray [ADDRESS] --workers N`` and ``fair run CONFIG --ray [ADDRESS]`` cut the
input into *blocks* (``plan``), hand them to N async worker actors (``worker``) that each run the
ordinary generate loop or ``pipeline.Job`` on their block, and merge the blocks' manifests
(``driver``). Each endpoint's real ``Admission`` runs once, in a limiter actor (``limiter``), and
the workers' engines hold a batching proxy of it, so limits are global. ``--metrics-port``: the
driver serves the cluster's ``/metrics`` (``metrics``: the workers' numbers, pulled at scrape time).

Run directory additions::

    blocks/plan.json              the blocks: size, per block the ids' sha256 (input fixed)
    blocks/<block>.fence          the block's current epoch; rewritten (new inode) on reassignment
    blocks/<block>.e<epoch>.json  an attempt's manifest (the driver merges them)
    blocks/pids/                  which process runs what (for operators and fault tests)
    cache/<block>.sqlite          the block's response cache (moves with the block)
    <kind>/shard-<block>.e<epoch>-NNNNN.jsonl   an attempt's records

Nothing here imports ray at module level except ``limiter``, ``worker`` and ``driver``, which
are imported only when ``--ray`` is given.
"""

from __future__ import annotations

import re

from fairdistill.engine.errors import ConfigError
from fairdistill.engine.options import RayOptions

WORKER_CPUS = 0.5  # what a worker actor asks of the cluster (the driver checks that they fit)
_HOSTPORT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def check_address(address: str) -> str:
    """``local`` | ``auto`` | ``HOST:PORT``; ``ConfigError`` (exit 2) naming what is wrong."""
    if address in ("local", "auto"):
        return address
    if address.startswith("ray://"):
        raise ConfigError(
            f"--ray {address}: Ray Client (ray://) addresses are not supported: the driver writes "
            "the run directory, so run fair on a node of the cluster with --ray auto or HOST:PORT"
        )
    m = _HOSTPORT.match(address)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"--ray {address!r}: expected local, auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    return address


def check_ray(ray: RayOptions | None, *, batch: bool) -> None:
    """``--ray``'s address is one we can join, and a Batch API endpoint is not sent to a cluster
    (``--workers`` / ``--block-size`` without ``--ray``: ``engine.flagcheck``)."""
    if ray is None:
        return
    check_address(ray.address)
    if batch:
        raise ConfigError("--mode batch is not supported with --ray (a Batch API needs no cluster)")


def import_ray():  # type: ignore[no-untyped-def]
    """ray, or a ``ConfigError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--ray needs the ray package: pip install 'fairdistill[ray]' (or scripts/setup.sh)"
        ) from None
    return ray
