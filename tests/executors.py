"""A second executor for the seam tests: the stdlib's urllib in worker threads, a client that
shares nothing with aiohttp. It counts what it sends and the most calls it had in flight."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping

from fairdistill.engine.request.executor import Reply, SendError, Target


class UrllibExecutor:
    def __init__(self) -> None:
        self.headers: dict[str, dict[str, str]] = {}
        self.sent = 0
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    async def open(self, targets: Mapping[str, Target]) -> None:
        for name, target in targets.items():
            self.headers[name] = {**target.headers, "Content-Type": "application/json"}

    async def send(self, target: Target, body: bytes, key: str | None = None) -> Reply:
        with self._lock:
            self.sent += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            return await asyncio.to_thread(self._post, target, body)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _post(self, target: Target, body: bytes) -> Reply:
        req = urllib.request.Request(target.url, data=body, headers=self.headers[target.slot])
        try:
            with urllib.request.urlopen(req, timeout=target.timeout_s) as resp:
                return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
        except TimeoutError:
            raise SendError(f"no reply within {target.timeout_s:g}s", timeout=True) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            raise SendError(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        self.headers.clear()
