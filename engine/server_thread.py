"""An asyncio server on a background thread, for synchronous code: tests, benchmarks, the demo.

Both in-process servers use it: the simulator (``engine.sim.SimThread``) and the student server
(``trainer.serve.StudentServer``)::

    thread = ServerThread(server.start, server.stop, name="fair-sim").start()  # raises what start raised
    ...
    thread.stop()   # runs server.stop() on its loop, then closes the loop and joins

A pure module (asyncio and threading only), so the trainer may import it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any


class ServerThread:
    """Runs ``start()`` on a fresh event loop in a daemon thread, then the loop until ``stop``."""

    def __init__(
        self,
        start: Callable[[], Awaitable[Any]],
        stop: Callable[[], Awaitable[Any]],
        name: str = "server",
        join_s: float = 30.0,
    ):
        self._start, self._stop, self.name, self.join_s = start, stop, name, join_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> ServerThread:
        """Start and wait until the server listens; its startup error is raised here."""
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._stop())
            loop.close()

    def stop(self) -> None:
        """Stop the loop, run the server's ``stop`` on it, join the thread. Idempotent."""
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(self.join_s)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
