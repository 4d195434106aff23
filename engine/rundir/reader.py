"""The one reader of run-directory shards, and the one set of rules for what is damaged.

Every reader (resume in ``fair run`` / ``fair generate`` with or without ``--ray``, ``fair
status``, ``fair export``, ``fair repair``, the trainer) reads shards through ``shard_lines``
and judges a line with ``check_line``, so whatever one of them calls damaged, all of them do:

* a line that is not the record its folder holds (not JSON, not an object, a field of the wrong
  type, no string ``id``) is damage, named ``file:line``;
* a sealed shard (``.jsonl``) whose last line has no newline is damage (a full disk, a hand
  edit); a ``.partial`` shard's torn last line is not: its writer cuts it when it resumes;
* a shard that ``manifest.json`` (or a done block's manifest) lists must exist with the sha256
  written there: a shard edited afterwards (a line deleted, the file emptied) is damage;
* a run directory, or a record, written by a newer ``schema_version`` is refused, naming both
  versions (never read as if it were this version's).

Damage is ``DamagedRunError`` (exit 2, pointing at ``fair repair``). ``open_shard`` is the only
place shard bytes are opened: decompression of sealed shards belongs there.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import orjson

from fairdistill.engine.errors import DamagedRunError, UsageError
from fairdistill.engine.rundir.schema import KINDS, SCHEMA_VERSION, TraceLine

ZST = ".zst"  # the suffix of a compressed sealed shard: shard-00000.jsonl.zst
_plain = msgspec.json.Decoder()
_decoders: dict[str, msgspec.json.Decoder | None] = {}


def open_shard(path: Path) -> IO[bytes]:
    """A shard's lines as bytes (the one place shards are opened): a sealed shard compressed
    with ``run.compress = "zstd"`` (``*.jsonl.zst``, see ``engine.rundir.store.ShardWriter``) is
    decompressed as it is read. Not seekable when compressed: see ``lines_at``."""
    f = open(path, "rb")  # noqa: SIM115 (returned open: the caller closes it)
    if not path.name.endswith(ZST):
        return f
    import zstandard  # only runs that chose compression need it

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=True), 1 << 20)


def lines_at(path: Path, offsets: list[int]) -> Iterator[bytes]:
    """The lines of a shard that start at ``offsets`` (byte offsets into the uncompressed
    lines, ascending): a seek each in a plain shard, one forward pass in a compressed one."""
    with open_shard(path) as f:
        if not path.name.endswith(ZST):
            for offset in offsets:
                f.seek(offset)
                yield f.readline()
            return
        want, pos = iter(offsets), 0
        nxt = next(want, None)
        for line in f:
            if nxt is None:
                return
            if pos == nxt:
                yield line
                nxt = next(want, None)
            pos += len(line)


def shard_lines(root: Path, path: Path) -> Iterator[tuple[int, bytes]]:
    """Every complete line of one shard with its 1-based number. A torn last line is skipped in
    a ``.partial`` shard and is ``DamagedRunError`` in a sealed one."""
    with open_shard(path) as f:
        for n, line in enumerate(f, 1):
            if line.endswith(b"\n"):
                yield n, line
            elif not path.name.endswith(".partial"):
                raise damaged(root, path, n, "torn line (no newline at the end)")


def record_decoder(kind: str) -> msgspec.json.Decoder | None:
    """The decoder that judges a line of folder ``kind``: its record type, ``TraceLine`` for the
    trace, None (any JSON object) for folders the engine does not know."""
    if kind not in _decoders:
        kinds = {**KINDS, "trace": TraceLine}
        _decoders[kind] = msgspec.json.Decoder(kinds[kind]) if kind in kinds else None
    return _decoders[kind]


def check_line(line: bytes, decoder: msgspec.json.Decoder | None) -> str | None:
    """Why a shard line is unreadable, or None when it is fine. A record of a newer schema is
    not damage: ``decode_line`` refuses it (``fair repair`` must not quarantine it)."""
    if not line.endswith(b"\n"):
        return "torn line (no newline at the end)"
    try:
        _decode(line, decoder)
    except _Unreadable as exc:
        return str(exc)
    return None


def decode_line(root: Path, path: Path, n: int, line: bytes, decoder: msgspec.json.Decoder | None) -> Any:
    """Line ``n`` of ``path`` decoded (a record, or a dict where ``decoder`` is None);
    ``DamagedRunError`` naming ``path:n`` when unreadable, ``UsageError`` when newer."""
    try:
        value = _decode(line, decoder)
    except _Unreadable as exc:
        raise damaged(root, path, n, exc) from None
    version = getattr(value, "schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise newer(f"{path}:{n}", version)
    return value


class _Unreadable(Exception):
    pass


def _decode(line: bytes, decoder: msgspec.json.Decoder | None) -> Any:
    try:
        value = (decoder or _plain).decode(line)
    except msgspec.ValidationError as exc:
        raise _Unreadable(f"not a valid record: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _Unreadable(f"not JSON: {exc}") from None
    if decoder is None and not isinstance(value, dict):
        raise _Unreadable("not a JSON object")
    return value


def damaged(root: Path, path: Path, n: int, why: object) -> DamagedRunError:
    text = str(why).splitlines()[0][:160] if str(why) else type(why).__name__
    return DamagedRunError(f"{path}:{n}", f"unreadable line: {text}", str(root))


def newer(where: str, version: object) -> UsageError:
    return UsageError(
        f"{where}: written by a newer fairdistill (schema_version {version}; this one reads "
        f"schema_version {SCHEMA_VERSION}): upgrade fairdistill to read or resume it"
    )


def check_version(root: Path, manifest: dict[str, Any]) -> None:
    """``UsageError`` (exit 2) naming both versions when ``manifest`` is of a newer schema."""
    version = manifest.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DamagedRunError(
            str(Path(root) / "manifest.json"), f"`schema_version` is {version!r}, not a version", str(root)
        )
    if version > SCHEMA_VERSION:
        raise newer(str(Path(root) / "manifest.json"), version)


def read_json(root: Path, path: Path) -> dict[str, Any] | None:
    """A JSON object file of the run directory (None if absent); ``DamagedRunError`` if not one."""
    try:
        value = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError as exc:
        raise DamagedRunError(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg}", str(root)) from None
    if not isinstance(value, dict):
        raise DamagedRunError(f"{path}:1", "not a JSON object", str(root))
    return value


def sha256(path: Path) -> str:
    """A shard's digest, read in chunks (shards can be larger than memory should hold)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
