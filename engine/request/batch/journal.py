"""The batch journal: ``RUN_DIR/batches/journal.jsonl``, one fsynced JSON line per event.

A batch moves ``open -> creating -> submitted -> ended -> ingested`` (events keyed by the local
id ``local``); a resume replays the journal to know which batches exist at the provider, so it
re-attaches to them instead of paying again::

    {"ev": "open", "local": "fb-...", "lane": "gpt", "t": 1733000000.1,
     "provider": "openai", "base_url": "https://api.openai.com/v1", "key_env": "OPENAI_API_KEY"}
    {"ev": "creating", "local": ..., "n": 120, "bytes": 88000, "t": ..., "ids": [custom ids]}
    {"ev": "creating", "local": ..., "status": "unreadable_reply"}   (answered 2xx, body unusable:
                                                 a rerun that cannot find it stops, never re-creates)
    {"ev": "submitted", "local": ..., "id": "batch_abc"}
    {"ev": "ended", "local": ..., "id": ..., "status": "completed", "results": "fb-....results.jsonl"}
    {"ev": "ingested", "local": ...}
    {"ev": "canceled", "local": ...}              (by ``fair batches cancel``)

A torn last line (a crash mid-write: no final newline) is cut when the journal opens; any other
unreadable line is a ``UsageError`` naming ``journal.jsonl:LINE`` (exit 2). Never a key or a body:
``key_env`` is the *name* of the variable holding the key, for ``fair batches cancel``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from fairdistill.engine.errors import UsageError

STATES = ("open", "creating", "submitted", "ended", "ingested")
Event = Literal["open", "creating", "submitted", "ended", "ingested", "canceled"]


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    ev: Event
    local: str
    lane: str = ""
    t: float = 0.0
    n: int = 0
    bytes: int = 0
    ids: list[str] = []
    id: str = ""
    status: str = ""
    results: str = ""
    provider: str = ""
    base_url: str = ""
    key_env: str = ""


class BatchInfo(msgspec.Struct, kw_only=True):
    """What the journal knows of one local batch: its last state and the facts on the way."""

    local: str
    lane: str = ""
    state: str = "open"
    t_open: float = 0.0
    t_create: float = 0.0
    n: int = 0
    bytes: int = 0
    ids: list[str] = []
    id: str = ""
    status: str = ""
    results: str = ""
    canceled: bool = False
    provider: str = ""
    base_url: str = ""
    key_env: str = ""


_decoder = msgspec.json.Decoder(Entry)
_encoder = msgspec.json.Encoder()


class Journal:
    """Append-only, fsynced per event. ``Journal(run_dir)`` reads what is there first."""

    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / "batches"
        self.path = self.folder / "journal.jsonl"
        self.batches: dict[str, BatchInfo] = {}
        self._fd: int | None = None
        if self.path.exists():
            self._replay()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, batches={len(self.batches)})"

    def _replay(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn last line: cut it
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
            data = data[:keep]
        for lineno, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                entry = _decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                why = str(exc).replace("`$.", "`")[:200]
                raise UsageError(
                    f"{self.path}:{lineno}: not a batch journal event ({why}); fix or remove that line"
                ) from None
            self._apply(entry)

    def _apply(self, e: Entry) -> None:
        b = self.batches.get(e.local)
        if b is None:
            b = self.batches[e.local] = BatchInfo(local=e.local)
        if e.ev == "canceled":
            b.canceled = True
            return
        if STATES.index(e.ev) >= STATES.index(b.state) or (e.ev == "submitted" and not b.id):
            b.state = e.ev
        if e.ev == "open":
            b.lane, b.t_open = e.lane, e.t
            b.provider, b.base_url, b.key_env = e.provider, e.base_url, e.key_env
        elif e.ev == "creating":
            if e.ids or e.n:  # a second ``creating`` only marks it (``status``: the reply was unreadable)
                b.t_create, b.n, b.bytes, b.ids = e.t, e.n, e.bytes, e.ids
            b.lane, b.status = e.lane or b.lane, e.status or b.status
        elif e.ev in ("submitted", "ended"):
            b.id = e.id or b.id
            b.status, b.results = e.status or b.status, e.results or b.results

    def write(self, ev: Event, local: str, **fields: Any) -> BatchInfo:
        """Append one event and fsync it before returning."""
        entry = Entry(ev=ev, local=local, **fields)
        if entry.t == 0.0 and ev in ("open", "creating"):
            entry.t = time.time()
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.writev(self._fd, (_encoder.encode(entry), b"\n"))  # (a line of 50k custom ids: no copy)
        os.fsync(self._fd)
        self._apply(entry)
        return self.batches[local]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
