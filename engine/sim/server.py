"""The simulator: an OpenAI-compatible chat server with hidden limits, faults and reasoning text,
and each provider's online and batch twin on the same server (a Gemini endpoint's base URL is
``{sim.url}/v1beta``).

Routes: ``GET /health``, ``GET /stats`` (the counters as JSON, ``by_key`` and ``by_group`` among
them) and ``POST /reset`` (zero the counters, refill every bucket, restore every key, empty the
per-organisation prompt caches) for
benchmarks that drive a simulator in another process; ``GET /sim/keys`` and ``POST
/sim/keys/{label}/revoke`` | ``/restore`` (see ``keys``); plus the wires, one module each:

- ``openai_chat``: ``POST /v1/chat/completions``, ``GET /v1/models`` (hidden limits and faults);
- ``anthropic``: ``POST /v1/messages``; ``gemini``: ``POST /v1beta/models/M:generateContent``;
- ``batch_openai``, ``batch_anthropic``, ``batch_gemini``: each provider's batch API over the
  shared batch core ``batch`` (``POST /sim/batch-faults`` sets its faults).

Imports flow one way: ``limits``/``profiles``/``content``/``strict``/``usage`` -> ``keys`` ->
``core`` (state and the content path) -> ``replies`` -> the wires -> this module.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import orjson
from aiohttp import web

from fairdistill.engine.errors import ConfigError
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.server_thread import ServerThread
from fairdistill.engine.sim.anthropic import AnthropicMessages
from fairdistill.engine.sim.batch import BatchSim
from fairdistill.engine.sim.batch_anthropic import AnthropicBatches
from fairdistill.engine.sim.batch_gemini import GeminiBatches
from fairdistill.engine.sim.batch_openai import OpenAIBatches
from fairdistill.engine.sim.core import SimCore, SimStats, load_problems
from fairdistill.engine.sim.limits import fmt_duration
from fairdistill.engine.sim.openai_chat import OpenAIChat
from fairdistill.engine.sim.profiles import SimProfile, load_profile
from fairdistill.engine.sim.replies import JSON

__all__ = ["SimServer", "SimStats", "SimThread", "cli_main", "fmt_duration", "load_problems", "start_sim"]


class SimServer(SimCore):
    """One simulated provider. Use ``start_sim`` (async), ``SimThread`` (sync) or ``fair sim``.
    ``batch`` is its batch state (``batch.faults``, ``batch.batches``)."""

    def __init__(
        self,
        profile: SimProfile | str | Path = "default",
        problems: list[Problem] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        super().__init__(profile, problems, host=host, port=port)
        self.batch = BatchSim(self)
        self.openai = OpenAIChat(self)
        self._wires = (
            self.openai,
            AnthropicMessages(self),
            OpenAIBatches(self.batch),
            AnthropicBatches(self.batch),
            GeminiBatches(self.batch),
        )
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/reset", self._reset)
        app.router.add_post("/sim/batch-faults", self.batch.set_faults)
        self.keys.mount(app)  # GET /sim/keys, POST /sim/keys/{label}/revoke|restore
        for wire in self._wires:
            wire.mount(app)
        return app

    async def start(self) -> SimServer:
        # handler_cancellation: a hung request is cancelled when its client goes away
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.started_at = time.monotonic()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- routes ------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)

    async def _stats(self, request: web.Request) -> web.Response:
        body = {**self.stats.as_dict(), "in_flight": self.in_flight}
        if request.query.get("latency"):
            body["server_latency_ms"] = self.latency_summary()
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    def latency_summary(self) -> dict[str, float]:
        """Quantiles of the server-side time of recent 200 replies (what x-sim-latency-ms said)."""
        data = sorted(self.latencies_ms)
        if not data:
            return {}

        def q(p: float) -> float:
            return round(data[min(len(data) - 1, int(p * len(data)))], 3)

        return {"n": len(data), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(data[-1], 3)}

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        self.latencies_ms.clear()
        for m in self.models.values():
            m.stats = self.stats.by_model[m.name]
            m.reset()
        self.keys.reset()
        self.started_at = time.monotonic()
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)


# -- ways to run it ------------------------------------------------------------------------------


def start_sim(
    profile: SimProfile | str | Path = "default",
    problems: list[Problem] | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
) -> SimServer:
    """``async with start_sim(profile, problems) as sim:`` a simulator on ``sim.base_url``."""
    return SimServer(profile, problems, host=host, port=port)


class SimThread:
    """The simulator in a background thread with its own event loop, for synchronous code::

    with SimThread("committee", problems) as sim:
        run_something(sim.base_url)
    """

    def __init__(
        self,
        profile: SimProfile | str | Path = "default",
        problems: list[Problem] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ):
        self.server = SimServer(profile, problems, host=host, port=port)
        self._thread = ServerThread(self.server.start, self.server.stop, name="fair-sim", join_s=10)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def stats(self) -> SimStats:
        return self.server.stats

    def start(self) -> SimThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> SimThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cli_main(args) -> int:
    """``fair sim [--host H] [--port P] [--profile NAME|FILE.toml] [--dataset NAME]``."""
    profile = load_profile(args.profile)
    dataset = getattr(args, "dataset", None)
    problems = load_problems(dataset) if dataset else None
    reasoning = any(m.content != "echo" for m in profile.models.values())
    if problems is None and not profile.dataset and reasoning:
        try:  # reasoning models need problems to answer; the built-in set is always at hand
            problems = load_problems("builtin")
        except (ConfigError, OSError) as exc:
            print(
                f"fair sim: no --dataset and no built-in set ({exc}); unknown questions get a generic reply",
                file=sys.stderr,
            )
    server = SimServer(profile, problems, host=args.host, port=args.port)

    async def serve() -> None:
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        models = ", ".join(server.profile.models)
        known = f"{len(server.reasoning.by_line)} known problems"
        if profile.keys:  # labels only, never a value
            known += f"; keys {', '.join(profile.keys)}"
        print(
            f"fair sim: profile {profile.name!r} ({models}; {known}) on {server.base_url}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        await server.stop()

    asyncio.run(serve())
    return 0
