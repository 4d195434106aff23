"""Live progress on stderr for ``fair run``, ``fair generate`` and ``fair train``, built on ``rich``.

    bar = Progress(total=1000, label="responses")
    engine.observe(bar)          # calls/s, tokens/s, $, 429s and retries from the request events
    with bar:                    # or `async with`
        ...
        bar.done += 1            # an int add per record; nothing else runs per record
        bar.fields["loss"] = "0.41"   # free-form fields shown after the counters (the trainer)

On a terminal: a ``rich`` bar with done/total, records/s, elapsed and ETA, then the counters,
redrawn ``rate_hz`` times a second by rich's refresh thread. Elsewhere (a file, a pipe, CI): a
plain line every ``interval_s`` seconds and a last one at the end, so logs stay readable. The
redraw runs in a thread, so the same object serves an asyncio job and the trainer's plain loop.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Column
from rich.text import Text

from fairdistill.engine.request.events import Call, Observer
from fairdistill.engine.types import Completion


class Progress(Observer):
    """Records done of a total, plus the request counters of the engines it observes."""

    def __init__(
        self,
        total: int | None,
        *,
        label: str = "done",
        enabled: bool = True,
        stream: TextIO | None = None,
        rate_hz: float = 4.0,
        interval_s: float = 10.0,
        extra: Callable[[], str] | None = None,
        requests: bool = True,
        tty: bool | None = None,
        width: int | None = None,
    ):
        self.total = total
        self.done = 0  # finished in this run (the caller increments it)
        self.resumed = 0  # found finished from an earlier run
        self.fields: dict[str, Any] = {}
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width  # terminal columns (None: ask the terminal)
        self.rate_hz = rate_hz
        self.interval_s = interval_s
        self.extra = extra
        self.requests = requests  # show the request counters (off for the trainer)
        self.calls = self.tokens = self.http_429 = self.retries = self.cached_calls = 0
        self.cost_usd = 0.0
        self.started = time.monotonic()
        self._rich: RichProgress | None = None
        self._task: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- request events -------------------------------------------------------------------------
    def sent(self, call: Call) -> None:
        self.calls += 1

    def cached(self, call: Call, done: Completion) -> None:
        self.cached_calls += 1

    def throttled(self, call: Call) -> None:
        self.http_429 += 1

    def retried(self, call: Call) -> None:
        self.retries += 1

    def completed(self, call: Call, done: Completion) -> None:
        self.tokens += done.usage.prompt_tokens + done.usage.completion_tokens
        self.cost_usd += done.cost_usd

    # -- caller API -----------------------------------------------------------------------------
    def advance(self, n: int = 1) -> None:
        self.done += n

    @property
    def finished(self) -> int:
        return self.resumed + self.done

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Progress:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.started = time.monotonic()
        if not self.enabled or self._thread is not None or self._rich is not None:
            return
        self._stop.clear()
        if self.tty:
            console = Console(file=self.stream, force_terminal=True, width=self.width)
            self._rich = _Bar(
                self,
                _Label(self),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(self),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                _Counters(self),
                console=console,
                refresh_per_second=self.rate_hz,
            )
            self._task = self._rich.add_task(self.label, total=self.total)
            self._rich.start()
        else:
            self._thread = threading.Thread(target=self._lines, name="fair-progress", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop redrawing and show the final state (always ending its line)."""
        if not self.enabled:
            return
        self._stop.set()
        if self._rich is not None:
            self._rich.stop()  # its last refresh syncs the counts
            self._rich = None
            return
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._write(self.line())

    def note(self, text: str) -> None:
        """A line of its own, above the bar on a terminal (a validation loss, a warning)."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            self._write(text)

    # -- drawing --------------------------------------------------------------------------------
    def _lines(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write(self.line())

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed (e.g. a pipe reader went away)
            self.enabled = False

    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def counters(self) -> str:
        """The request counters and the caller's fields, as one ``a | b | c`` string."""
        elapsed = self.elapsed_s()
        parts = []
        if self.requests:
            parts += [
                f"calls {self.calls / elapsed:,.1f}/s",
                f"tok {self.tokens / elapsed:,.0f}/s",
                f"${self.cost_usd:,.4f}",
                f"429 {self.http_429:,}",
                f"retries {self.retries:,}",
            ]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        if self.extra is not None:
            parts.append(self.extra())
        return " | ".join(parts)

    def line(self) -> str:
        """The plain-text line (non-terminal output)."""
        elapsed = self.elapsed_s()
        finished = self.finished
        total = f"/{self.total:,}" if self.total is not None else ""
        parts = [f"{self.label} {finished:,}{total}", _per_s(self.done / elapsed)]
        if counters := self.counters():
            parts.append(counters)
        if self.total and self.done and finished < self.total:
            parts.append(f"eta {(self.total - finished) / (self.done / elapsed):,.0f}s")
        parts.append(f"{elapsed:,.0f}s")
        return " | ".join(parts)


def _per_s(rate: float) -> str:
    """A rate readable at 5,000/s and at one step a minute alike."""
    return f"{rate:,.1f}/s" if rate >= 1 or rate == 0 else f"{rate:.3f}/s"


class _Bar(RichProgress):
    """rich's Progress, told the owner's counts just before each redraw (not per record)."""

    def __init__(self, owner: Progress, *columns: Any, **kw: Any):
        self._owner = owner  # before rich's __init__, which may render once
        super().__init__(*columns, **kw)

    def get_renderables(self) -> Iterable[RenderableType]:
        o = self._owner
        if o._task is not None:
            self.update(o._task, completed=o.finished, total=o.total)
        yield from super().get_renderables()


class _Label(ProgressColumn):
    def __init__(self, owner: Progress):
        super().__init__()
        self._owner = owner

    def render(self, task: Any) -> Text:
        return Text(self._owner.label, style="bold")


class _Rate(ProgressColumn):
    def __init__(self, owner: Progress):
        super().__init__()
        self._owner = owner

    def render(self, task: Any) -> Text:
        o = self._owner
        return Text(_per_s(o.done / o.elapsed_s()), style="progress.data.speed")


class _Counters(ProgressColumn):
    def __init__(self, owner: Progress):
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis"))
        self._owner = owner

    def render(self, task: Any) -> Text:
        return Text(self._owner.counters())
