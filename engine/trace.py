"""Call trace: one JSON line per API call in ``RUN_DIR/trace/shard-*.jsonl``.

Fields: ts (unix seconds), endpoint, model, latency_s, prompt/completion tokens, cost_usd,
attempts, http_429 (rate-limit answers before it went through), cache_hit, status (HTTP status
of the last attempt; 0 = no answer) and error (the exception class of a failed call). Never a
key, a header or a message body.

Lines are encoded with msgspec and written in batches (64 KiB or once a second) with plain
``os.write``; a SIGKILL loses at most the last second of trace, never a record. Each ``Trace``
opens a new shard, so a resumed run appends its own file beside the old ones.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import msgspec

FLUSH_BYTES = 64 * 1024
FLUSH_AFTER_S = 1.0


class TraceEvent(msgspec.Struct, kw_only=True):
    ts: float
    endpoint: str
    model: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    http_429: int = 0
    cache_hit: bool = False
    status: int = 0
    error: str | None = None


_SHARD = re.compile(r"^shard-(?:[\w.]+-)?(\d{5})\.jsonl$")


class Trace:
    """Buffered JSONL writer of ``TraceEvent`` lines."""

    def __init__(self, folder: str | Path, writer: str = ""):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        prefix = f"shard-{writer}-" if writer else "shard-"
        nums = [
            int(m.group(1))
            for p in self.folder.iterdir()
            if p.name.startswith(prefix) and (m := _SHARD.match(p.name))
        ]
        self.path = self.folder / f"{prefix}{max(nums, default=-1) + 1:05d}.jsonl"
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._buf = bytearray()
        self._last = time.monotonic()
        self._encoder = msgspec.json.Encoder()
        self.lines = 0

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r})"

    def write(self, event: TraceEvent) -> None:
        self._encoder.encode_into(event, self._buf, -1)
        self._buf += b"\n"
        self.lines += 1
        if len(self._buf) >= FLUSH_BYTES or time.monotonic() - self._last > FLUSH_AFTER_S:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if self._buf and self._fd is not None:
            data = bytes(self._buf)
            self._buf.clear()
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
