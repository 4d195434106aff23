"""A second executor for the seam tests: the stdlib's urllib in worker threads, a client that
shares nothing with aiohttp. It counts what it sends and the most calls it had in flight."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping

from engine.request.executor import Reply, SendError


class UrllibExecutor:
    def __init__(self) -> None:
        self.headers: dict[str, dict[str, str]] = {}
        self.sent = 0
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    async def open(self, lanes: Mapping) -> None:
        for name, lane in lanes.items():
            self.headers[name] = {
                **lane.provider.headers(lane.key),
                **lane.cfg.headers,
                "Content-Type": "application/json",
            }

    async def send(self, lane, body: bytes, key: str | None = None) -> Reply:
        with self._lock:
            self.sent += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            return await asyncio.to_thread(self._post, lane, body)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _post(self, lane, body: bytes) -> Reply:
        req = urllib.request.Request(lane.provider.url, data=body, headers=self.headers[lane.name])
        try:
            with urllib.request.urlopen(req, timeout=lane.cfg.timeout_s) as resp:
                return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
        except TimeoutError:
            raise SendError(f"no reply within {lane.cfg.timeout_s:g}s", timeout=True) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            raise SendError(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        self.headers.clear()
