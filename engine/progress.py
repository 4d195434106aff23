"""A one-line live progress display on stderr, cheap enough to leave on at 5,000 calls/s.

    async with Progress(total=1000, stats=engine.stats, label="responses") as progress:
        ...
        progress.done += 1      # an int add per record; nothing else runs per record

A background task redraws the line at most ``rate_hz`` times a second (4 on a terminal; a
plain line every 10 s when stderr is a file or a pipe, so logs stay readable). It shows
done/total, records/s, calls/s, tokens/s, dollars spent, 429s and retries, summed over the
endpoints' ``EndpointStats``; ``extra`` adds a caller's own fields (e.g. the pipeline's counts).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO


class Progress:
    def __init__(
        self,
        total: int | None,
        stats: Mapping[str, Any] | None = None,
        *,
        label: str = "done",
        enabled: bool = True,
        stream: TextIO | None = None,
        rate_hz: float = 4.0,
        extra: Callable[[], str] | None = None,
    ):
        self.total = total
        self.done = 0  # records finished in this run (the caller increments it)
        self.resumed = 0  # records found finished from an earlier run
        self.stats = stats or {}
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.interval = 1.0 / rate_hz if self.tty else 10.0
        self.extra = extra
        self.started = time.monotonic()
        self._task: asyncio.Task | None = None
        self._width = 0

    async def __aenter__(self) -> Progress:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.started = time.monotonic()
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Stop redrawing and print the final line (always on its own line)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.enabled:
            self.draw(final=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.draw()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        calls = toks = r429 = retries = 0
        cost = 0.0
        for s in self.stats.values():
            calls += s.calls
            toks += s.prompt_tokens + s.completion_tokens
            cost += s.cost_usd
            r429 += s.http_429
            retries += s.retries
        finished = self.resumed + self.done
        total = f"/{self.total:,}" if self.total is not None else ""
        parts = [
            f"{self.label} {finished:,}{total}",
            f"{self.done / elapsed:,.1f}/s",
            f"calls {calls / elapsed:,.1f}/s",
            f"tok {toks / elapsed:,.0f}/s",
            f"${cost:,.4f}",
            f"429 {r429:,}",
            f"retries {retries:,}",
        ]
        if self.extra is not None:
            parts.append(self.extra())
        if self.total and self.done and finished < self.total:
            parts.append(f"eta {(self.total - finished) / (self.done / elapsed):,.0f}s")
        parts.append(f"{elapsed:,.0f}s")
        return " | ".join(parts)

    def draw(self, final: bool = False) -> None:
        text = self.line()
        try:
            if self.tty:
                pad = " " * max(0, self._width - len(text))
                self._width = len(text)
                self.stream.write("\r" + text + pad + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed (e.g. a pipe reader went away)
            self.enabled = False
