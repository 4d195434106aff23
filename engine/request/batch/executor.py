"""``BatchExecutor``: an ``engine.request.executor.Executor`` that sends a ``mode = "batch"`` endpoint's
requests through the provider's Batch API; other endpoints go online (``HttpExecutor``).

``send(target, body, key)`` puts the encoded body into the endpoint's open batch and returns the item's
``(status, raw reply, headers)`` when that batch has ended, so the engine's cache, stages and
provider decoding are unchanged. A batch is submitted after ``linger_s`` without a new request,
or at ``max_items`` / ``max_bytes``; at most ``max_open`` batches are at the provider at once
(while they are full, the open batch keeps growing). A queued body waits on disk, in the lane's
spool (an unlinked temporary file); the upload is written from it to ``batches/<local>.input``
and streamed, and results stream to disk and are read back line by line, so a 50k-request batch
is never in memory whole. A waiting request is a slot in compact arrays (~100 bytes,
``engine.request.batch.slots``); its caller is a future (``send``) or a token that the streaming
caller's one callback gets back (``enqueue``: ``fair generate --mode batch``). Batch lanes take
``Unmetered`` admission: the online rpm/tpm and concurrency caps do not apply (providers meter
batches apart, and a slot per waiting item would cap the batch size).

Item outcomes: a reply (200) or a refusal (4xx, e.g. an invalid request) is returned as is; an
expired, canceled or 5xx item, or one missing from the results, goes into a later batch, at
most ``max_rounds`` batches in all; then ``fallback = "online"`` sends it once online, ``"none"``
answers 422 (the record fails, saying why). 401/403 on a control call aborts the run (with a key
pool: see below). Results are
downloaded again while a line is unreadable (free); the last try keeps every readable line and
sends the unreadable items round again. A batch whose status polls fail ``max_poll_failures`` times
in a row (404, 5xx, an unusable object), or that outlives ``deadline_s``, stops the run (exit 1)
with one line naming it and the ``fair batches`` commands: never a silent endless poll.

Never paying twice: every batch is journalled (``engine.request.batch.journal``) before and after its
create; its results are saved to ``RUN_DIR/batches/<local>.results.jsonl`` before they are handed
out. On open, a resume re-attaches to submitted batches, re-reads (or downloads again) ended
ones, and looks up batches whose create reply was lost or unreadable (``wire.find``; a create
answered 2xx in a body we cannot use is never made again: not found, the run stops); a send
whose custom_id is among them waits for that batch instead of submitting again. ``custom_id`` is
``fd`` + the first 40 hex digits of the request's cache key (the ``key`` the engine passes, ``-i``
kept for part i of a fan-out), so a rerun names every request as before; a send whose
``custom_id`` already waits shares that item's answer (never a second item for the same request).
Replies carry the batch id in ``BATCH_HEADER`` (the trace shows it).

Key pools (``keys = [...]``): one lane per key (``Target.slot``), with its own open batch, batches
at the provider, wire and credentials, since a provider scopes a batch to the organisation of the
key that made it; the journal names that key's *variable* per batch, so a resume (and ``fair
batches``) polls each batch with its own key. The engine picks each request's key (``keys.
Unmetered``); a request already waiting on another key joins it there. A key the Batch API
refuses (401/403) is retired for the run (one stderr line naming its variable): what it had not
submitted goes to the live keys; its submitted batches are still polled, and when that is refused
too their requests are never made again and get no record (``KeptAtProvider``: the run ends with
exit 1 after the rest, and a rerun once the key works collects them). No key left: exit 3.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from fairdistill.engine.errors import AbortRun, AuthError, ConfigError, FairError, one_line
from fairdistill.engine.request.batch.anthropic import AnthropicBatchWire
from fairdistill.engine.request.batch.gemini import GeminiBatchWire
from fairdistill.engine.request.batch.journal import BatchInfo, Journal
from fairdistill.engine.request.batch.keys import KeptAtProvider, Unmetered
from fairdistill.engine.request.batch.openai import OpenAIBatchWire
from fairdistill.engine.request.batch.slots import KEY, OPEN, CidList, Slots, pack, unpack
from fairdistill.engine.request.batch.wire import (
    TRANSIENT,
    ControlError,
    Lost,
    Outcome,
    Refused,
    Remote,
    Truncated,
    file_lines,
)
from fairdistill.engine.request.executor import (
    BATCH_HEADER,
    KEY_HEADER,
    BatchTarget,
    Executor,
    HttpExecutor,
    Reply,
    SendError,
    Target,
)
from fairdistill.engine.request.providers import error_message, redact

if TYPE_CHECKING:
    from fairdistill.engine.config import BatchConfig, EndpointConfig

CREATE_TRIES = 5
DOWNLOAD_TRIES = 6
HAND_OUT = 1000  # answers handed out between two yields to the event loop
_enc = msgspec.json.Encoder()
Sink = Callable[[int, Reply | BaseException], None]  # a streaming caller's (token, outcome) callback


class BatchAmbiguous(FairError):
    """A lost create matches more than one provider batch: a person must choose (exit 1)."""


class BatchAmbiguousAbort(AbortRun):
    """The same, found during a run: the run stops, exit 1 (a person's choice, not a fault)."""

    exit_code = 1


class BatchUnreadable(AbortRun):
    """A batch ended but its results stay unreadable: stop rather than pay for them again."""


class BatchStalled(AbortRun):
    """A submitted batch cannot be followed (its polls keep failing, or it outlived
    ``batch.deadline_s``): the run stops naming it, exit 1 (a person decides what next)."""

    exit_code = 1


NO_BATCH = 0  # a batch serial no slot has (serials count from 1)
UNREADABLE = "unreadable_reply"  # the journal's mark on a create answered 2xx in a body we cannot use


def custom_id(batch: BatchTarget, body: bytes, key: str | None = None) -> str:
    """``fd`` + 40 hex digits of the cache key ``key`` (+ its ``-i`` part suffix), within Anthropic's
    ``^[a-zA-Z0-9_-]{1,64}$``; without a key, of a blake2b of the endpoint identity and the body."""
    if key is not None:
        head, _, part = key.partition("-")
        if re.fullmatch(r"[0-9a-f]{40,}", head) and re.fullmatch(r"[0-9]{0,9}", part):
            return f"fd{head[:40]}-{part}" if part else f"fd{head[:40]}"
    who = f"{batch.provider}\0{batch.base_url.rstrip('/')}\0{batch.model}\0"
    h = hashlib.blake2b(who.encode(), digest_size=20)
    h.update(body)
    return "fd" + h.hexdigest()


class _Lane:
    """The batch state of one endpoint, or of one key of its pool (``Target.slot``): its open
    batch, the batches it has at the provider and its wire (with that key's credentials)."""

    def __init__(
        self,
        target: Target,
        batch: BatchTarget,
        wire: Any,
        session: aiohttp.ClientSession,
        folder: Path,
        index: int = 0,
    ):
        self.target = target
        self.batch = batch
        self.name = target.endpoint
        self.key = target.secret
        self.key_env = target.key_env or ""  # the variable's name, journalled per batch
        self.pooled = target.pooled
        self.index = index  # its key's place in the endpoint's pool (``Unmetered.pick``)
        self.retired = False  # the Batch API refused its key: no new batch goes out with it
        # the queued bodies; closed (and so gone) in BatchExecutor.close
        self.spool = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115
        self.spool_end = 0
        self.cfg: BatchConfig = batch.settings
        self.wire = wire
        self.session = session
        self.max_items = min(self.cfg.max_items, wire.max_items)
        self.max_bytes = min(self.cfg.max_bytes, wire.max_bytes)
        self.items = Slots()  # the requests waiting, each a slot (its body in ``spool``)
        self.open = array("q")  # the slots in the open batch
        self.open_bytes = 0
        self.last_add = 0.0
        self.timer: asyncio.Task | None = None
        self.flush_pending = False
        self.at_provider = asyncio.Semaphore(self.cfg.max_open)
        self.attached: dict[str, int] = {}  # custom_id -> serial of a re-attached running batch


class _Row(msgspec.Struct):
    c: str
    s: int
    b: msgspec.Raw = msgspec.Raw(b"null")


_row = msgspec.json.Decoder(_Row)


class BatchExecutor:
    """Batch lanes through the provider's Batch API, the rest through ``online`` (HTTP)."""

    def __init__(self, run_dir: str | Path, online: Executor | None = None):
        self.run_dir = Path(run_dir)
        self.online: Executor = online if online is not None else HttpExecutor()
        self.journal: Journal | None = None
        self.stats: Counter[str] = Counter()  # batches_created, items_submitted, requeued, fallback...
        self._lanes: dict[str, _Lane] = {}  # by Target.slot: an endpoint, or one key of its pool
        self._pools: dict[str, list[_Lane]] = {}  # endpoint -> its lanes, in the pool's key order
        self._admissions: dict[str, Unmetered] = {}
        self._known: dict[str, Reply | BaseException] = {}  # answers no caller waited for (yet)
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[str, str] = {}  # local id -> provider id, submitted and not ended
        self._creating: set[str] = set()  # local ids whose create has no answer yet
        self._error: BaseException | None = None
        self._serial = itertools.count(1)

    def __repr__(self) -> str:
        return f"BatchExecutor(batch_lanes={list(self._lanes)}, running={len(self._running)})"

    # -- lifecycle ----------------------------------------------------------------------------

    def admission(self, endpoint: str, cfg: EndpointConfig) -> Unmetered:
        """The admission of batch endpoint ``endpoint``: it picks each request's key of a pool,
        skipping the keys this executor retired (the Batch API refused them)."""
        self._admissions[endpoint] = adm = Unmetered(len(cfg.key_envs()), cfg.key_affinity)
        return adm

    async def open(self, targets: Mapping[str, Target]) -> None:
        await self.online.open(targets)
        batch = [t for t in targets.values() if t.batch is not None]
        if not batch:
            return
        self.journal = Journal(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wires = {"openai": OpenAIBatchWire, "anthropic": AnthropicBatchWire, "gemini": GeminiBatchWire}
        for target in batch:  # one lane per endpoint, or per key of its pool
            assert target.batch is not None
            b = target.batch
            session = aiohttp.ClientSession(
                headers={k: v for k, v in target.headers.items() if k.lower() != "content-type"},
                timeout=aiohttp.ClientTimeout(total=target.timeout_s),
            )
            wire = wires[b.provider](session, b.base_url, target.secret, target.endpoint, b.model)
            pool = self._pools.setdefault(target.endpoint, [])
            st = _Lane(target, b, wire, session, self.run_dir, len(pool))
            pool.append(st)
            self._lanes[target.slot] = st
        for stale in (*self.journal.folder.glob("*.input"), *self.journal.folder.glob("*.results.tmp")):
            stale.unlink(missing_ok=True)  # an upload or a results file a killed run left half-done
        try:
            await self._resume()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, set()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._running:
            ids = one_line(", ".join(sorted(self._running.values())[:5]), 300)
            print(
                f"fair: {len(self._running)} batch(es) still running at the provider ({ids}); they are "
                f"recorded in {self.run_dir / 'batches' / 'journal.jsonl'}: run the same command again to "
                f"re-attach, or `fair batches cancel {self.run_dir}`",
                file=sys.stderr,
            )
        if self._creating:
            print(
                f"fair: {len(self._creating)} batch create(s) had no answer yet; run the same command again "
                "to find them at the provider (nothing is paid twice)",
                file=sys.stderr,
            )
        for st in self._lanes.values():
            await st.session.close()
            st.spool.close()
        self._lanes, self._pools = {}, {}
        if self.journal is not None:
            self.journal.close()
        await self.online.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """A batch task died (refused credentials, an ambiguous lost create...): every caller
        waiting gets the error, and later sends too."""
        if self._error is None:
            self._error = exc
        for st in self._lanes.values():
            for slot in list(st.items.waiting()):
                _deliver(st.items.take(slot), exc)

    # -- the seam -----------------------------------------------------------------------------

    async def send(self, target: Target, body: bytes, key: str | None = None) -> Reply:
        if target.endpoint not in self._pools:
            return await self.online.send(target, body, key)
        # a cancelled caller's item stays waiting: a later send of it adopts the item (no second
        # one), or its answer is kept for one (``_known``)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._add(target, body, key, future, -1)
        return await future

    def enqueue(self, target: Target, body: bytes, key: str | None, sink: Sink, token: int) -> None:
        """``send`` without a coroutine or a future, for streaming callers such as ``fair generate
        --mode batch``: ``sink(token, outcome)`` is called once with ``(status, raw, headers)`` or
        the exception, from the event loop; it must not raise. A waiting request costs a slot."""
        self._add(target, body, key, sink, token)

    def _add(self, target: Target, body: bytes, key: str | None, waiter: Any, token: int) -> None:
        pool = self._pools[target.endpoint]
        cid = custom_id(pool[0].batch, body, key)
        outcome = self._error if self._error is not None else self._known.get(cid)
        if outcome is not None:  # a failed run, or an earlier run's batch answered it
            if isinstance(waiter, asyncio.Future):
                _deliver(((waiter, token),), outcome)
            else:
                asyncio.get_running_loop().call_soon(waiter, token, outcome)
            return
        packed = pack(cid)
        assert packed is not None, cid
        self._put(self._home(pool, target.slot, cid, packed), cid, packed, body, waiter, token)

    def _home(self, pool: list[_Lane], slot: str, cid: str, packed: bytes) -> _Lane:
        """The lane a request joins: the key where it already waits (or whose earlier batch holds
        it), else the key it was sent with while that key is live, else another live key."""
        if len(pool) > 1:
            for st in pool:
                if cid in st.attached or st.items.find(packed) >= 0:
                    return st
        st = self._lanes.get(slot, pool[0])
        if not st.retired:
            return st
        live = [other for other in pool if not other.retired]
        return live[int.from_bytes(packed[:4], "big") % len(live)] if live else st

    def _put(
        self, st: _Lane, cid: str, packed: bytes, body: bytes, waiter: Any, token: int, rounds: int = 0
    ) -> None:
        """Add one caller's request to ``st``: a new slot, or the slot of the same request."""
        items = st.items
        if (slot := items.find(packed)) >= 0:  # the same request waits: one item
            if items.join(slot, waiter, token):  # (or its caller went away: this one takes it over)
                self.stats["shared"] += 1
            return
        st.spool.write(body)  # a waiting request keeps only its slot in memory
        slot = items.add(packed, waiter, token, st.spool_end, len(body))
        items.rounds[slot] = rounds
        st.spool_end += len(body)
        if (serial := st.attached.get(cid)) is not None:  # a re-attached batch of an earlier run has it
            items.batch[slot] = serial
        else:
            self._enqueue(st, slot)

    # -- grouping -----------------------------------------------------------------------------

    @staticmethod
    def _body(st: _Lane, slot: int) -> bytes:
        st.spool.flush()
        return os.pread(st.spool.fileno(), st.items.size[slot], st.items.pos[slot])

    def _enqueue(self, st: _Lane, slot: int) -> None:
        st.items.batch[slot] = OPEN
        st.open.append(slot)
        st.open_bytes += st.items.size[slot] + 120
        st.last_add = time.monotonic()
        if len(st.open) >= st.max_items or st.open_bytes >= st.max_bytes:
            self._want_flush(st)
        elif st.timer is None:
            st.timer = self._spawn(self._linger(st))

    async def _linger(self, st: _Lane) -> None:
        try:
            while st.open and (wait := st.last_add + st.cfg.linger_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
        finally:
            st.timer = None
        if st.open:
            self._want_flush(st)

    def _want_flush(self, st: _Lane) -> None:
        if not st.flush_pending:
            st.flush_pending = True
            self._spawn(self._flush(st))

    async def _flush(self, st: _Lane) -> None:
        await st.at_provider.acquire()  # while max_open batches run, the open one keeps growing
        st.flush_pending = False
        k, size, sizes = 0, 0, st.items.size
        while k < len(st.open) and k < st.max_items and size + sizes[st.open[k]] + 120 <= st.max_bytes:
            size += sizes[st.open[k]] + 120
            k += 1
        taken = st.open[:k]
        del st.open[:k]
        st.open_bytes -= size
        if st.open:
            if len(st.open) >= st.max_items or st.open_bytes >= st.max_bytes:
                self._want_flush(st)
            elif st.timer is None:
                st.timer = self._spawn(self._linger(st))
        try:
            live = array("q")
            for slot in taken:
                if st.items.live(slot):
                    live.append(slot)
                else:  # answered or cancelled before it went out: not sent
                    st.items.unlink(slot)
                    st.items.free(slot)
            del taken
            if live:
                await self._submit(st, live)  # it empties ``live`` once the upload is written
        finally:
            st.at_provider.release()

    # -- one batch ----------------------------------------------------------------------------

    async def _submit(self, st: _Lane, live: array) -> None:
        assert self.journal is not None
        name = st.name
        serial = next(self._serial)
        local = f"fb-{int(time.time() * 1000):x}-{os.getpid()}-{serial}"
        items = st.items
        blob = bytearray()
        for slot in live:
            blob += items.keys[slot * KEY : (slot + 1) * KEY]
            items.batch[slot] = serial
        ids = CidList(blob)
        cfg = st.batch
        key_env = cfg.key_env or ""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key_env) or redact(key_env) != key_env:
            key_env = ""  # only a variable's name is written, never something shaped like a key
        self.journal.write(
            "open", local, lane=name, provider=cfg.provider, base_url=cfg.base_url, key_env=key_env
        )
        size = sum(items.size[slot] for slot in live)
        # the ids go out as raw JSON, and the journal keeps the packed ids, not 50k strings
        info = self.journal.write(
            "creating", local, lane=name, n=len(ids), bytes=size, ids=msgspec.Raw(ids.json())
        )
        info.ids = ids  # type: ignore[assignment]  # a Sequence[str], as the journal reads it
        self._creating.add(local)
        upload = self.journal.folder / f"{local}.input"
        try:
            with open(upload, "wb") as f:  # the upload, streamed from disk
                st.wire.write_input(
                    ((cid, self._body(st, slot)) for cid, slot in zip(ids, live, strict=True)), f
                )
            del live[:]  # from here on, the batch is its ids: answers find their slot by custom id
            remote = await self._create(st, local, info.t_create, upload, ids, serial)
        finally:
            self._creating.discard(local)
            upload.unlink(missing_ok=True)
        if remote is None:
            return
        self.journal.write("submitted", local, id=remote.id)
        self.stats["batches_created"] += 1
        self.stats["items_submitted"] += len(ids)
        await self._watch(st, local, remote.id, ids, serial)

    async def _create(
        self, st: _Lane, local: str, t_create: float, upload: Path, ids: CidList, serial: int
    ) -> Remote | None:
        """Create the batch; a lost reply is looked up before trying again. None: the items
        have been answered (refused) or handed back to the engine to retry."""
        assert self.journal is not None
        last, answered, lost = "", False, False
        for attempt in range(CREATE_TRIES):
            if attempt:
                await asyncio.sleep(min(30.0, min(0.2, st.cfg.poll_s) * 2**attempt))
            try:
                if answered:  # the provider said it made one: look again, never create again
                    raise Lost(last, 200)
                return await st.wire.create(upload, local)
            except Lost as exc:
                last, answered, lost = str(exc), answered or 200 <= exc.status < 300, True
                found = await self._find(st, local, t_create, len(ids), live=True)
                if found is not None:
                    self.stats["creates_recovered"] += 1
                    return found
            except AuthError as exc:  # the key was refused: a pool goes on with its other keys
                self._refused_create(st, local, ids, serial, exc, maybe_made=lost)
                return None
            except ControlError as exc:  # the upload failed (a second upload is free): nothing was created
                last = str(exc)
            except Refused as exc:
                self.journal.write("ended", local, status="refused")
                body = _enc.encode({"error": {"message": error_message(exc.body, st.key)}})
                for cid in ids:
                    self._resolve(st, cid, exc.status, body, "")
                return None
        if answered:
            self.journal.write("creating", local, status=UNREADABLE)
            raise BatchAmbiguousAbort(self._unknown_create(st, local, last))
        self.journal.write("ended", local, status="not_created")
        error = SendError(f"could not create a batch: {last}")
        for key in ids.packed():  # the engine's retry boundary decides what comes next
            if (slot := st.items.find(key)) >= 0 and st.items.batch[slot] == serial:
                _deliver(st.items.take(slot), error)
        return None

    def _unknown_create(self, st: _Lane, local: str, why: str) -> str:
        """What to do about a create the provider answered in a body we could not read, when no
        provider batch matches it: stop, never create it again."""
        return (
            f"endpoint {st.name!r}: the create of batch {local} was answered but the reply was "
            f"unreadable ({why}) and no provider batch matches it; nothing was created again: find it at "
            f"the provider and run `fair batches attach {self.run_dir} {local} BATCH_ID`, or, if it does "
            f"not exist, `fair batches cancel {self.run_dir} {local}`; then run again"
        )

    async def _find(self, st: _Lane, local: str, t_create: float, n: int, live: bool) -> Remote | None:
        """The batch a lost create made, or None when there is none; ambiguity stops the run."""
        for attempt in range(CREATE_TRIES):
            try:
                found = await st.wire.find(local, t_create, n)
                break
            except ControlError:
                await asyncio.sleep(min(30.0, 0.2 * 2**attempt))
        else:
            raise (BatchAmbiguousAbort if live else BatchAmbiguous)(
                f"endpoint {st.name!r}: cannot tell whether batch {local} was created (listing "
                f"batches failed); see `fair batches list {self.run_dir}`"
            )
        known = {b.id for b in self.journal.batches.values() if b.id} if self.journal else set()
        found = [r for r in found if r.id not in known]  # batches of ours already accounted for
        if len(found) > 1 and self.journal is not None and local in self.journal.batches:
            found = [r for r in found if await self._may_hold(st, r, self.journal.batches[local].ids)]
        if len(found) > 1:
            ids = ", ".join(r.id for r in found)
            raise (BatchAmbiguousAbort if live else BatchAmbiguous)(
                f"endpoint {st.name!r}: the create of batch {local} ({n} requests) lost its reply and "
                f"{len(found)} provider batches match it ({ids}); attach the right one with "
                f"`fair batches attach {self.run_dir} {local} BATCH_ID` (and cancel the others with "
                f"`fair batches cancel {self.run_dir} BATCH_ID`), then run again"
            )
        return found[0] if found else None

    async def _may_hold(self, st: _Lane, remote: Remote, ids: Sequence[str]) -> bool:
        """False when ``remote`` has ended and its results are for other custom ids."""
        if not remote.ended or not ids:
            return True
        try:
            with tempfile.TemporaryFile(dir=self.run_dir) as f:
                await st.wire.download(remote, f)
                got = {cid for cid, _, _ in st.wire.parse(file_lines(f), remote, ids)}
        except (Truncated, ControlError):
            return True
        return got == set(ids)

    async def _watch(self, st: _Lane, local: str, bid: str, ids: Sequence[str], serial: int) -> None:
        """Poll until the batch ends, save its results, hand them out."""
        assert self.journal is not None
        self._running[local] = bid
        try:
            remote = await self._poll(st, local, bid)
            path = await self._download(st, remote, ids, local)
        except AuthError as exc:  # its key is refused now: never made again (see ``_given_up``)
            if not st.pooled:
                raise
            self._running.pop(local, None)
            self._given_up(st, local, bid, ids, serial, exc)
            self._retire(st, exc)
            return
        self.journal.write("ended", local, id=bid, status=remote.status, results=path.name)
        del self._running[local]
        await self._hand_out(st, path, ids, bid, serial)
        self.journal.write("ingested", local)

    async def _poll(self, st: _Lane, local: str, bid: str) -> Remote:
        """The batch once it has ended; ``BatchStalled`` after ``max_poll_failures`` failed polls
        in a row (404, 5xx, an unreadable object) or past ``deadline_s``: never a silent wait."""
        cfg, failures, last = st.cfg, 0, ""
        deadline = time.monotonic() + cfg.deadline_s
        while True:
            await asyncio.sleep(cfg.poll_s)
            try:
                remote = await st.wire.retrieve(bid)
            except ControlError as exc:
                failures, last = failures + 1, str(exc)
                if failures >= cfg.max_poll_failures:
                    why = f"{failures} status polls in a row failed (last: {last})"
                    raise self._stalled(st, local, bid, why) from None
            else:
                failures = 0
                if remote.ended:
                    return remote
            if time.monotonic() >= deadline:
                why = f"not ended after batch.deadline_s = {cfg.deadline_s:g} s"
                raise self._stalled(st, local, bid, why + (f" (last poll: {last})" if failures else ""))

    def _stalled(self, st: _Lane, local: str, bid: str, why: str) -> BatchStalled:
        """Stop following batch ``bid``: one message naming it and what a person can do."""
        self._running.pop(local, None)  # named here, not again in ``close``'s list
        run = self.run_dir
        return BatchStalled(
            f"endpoint {st.name!r}: batch {one_line(bid, 100)} ({local}): {why}; see `fair batches list "
            f"{run}`, run the same command again to re-attach, or `fair batches cancel {run} {local}` to "
            "stop it (and start over with a new batch)"
        )

    async def _download(self, st: _Lane, remote: Remote, ids: Sequence[str], local: str) -> Path:
        """The results, read to their end and saved; downloading again is free, paying again is
        not: when they stay unreadable the run stops, and a rerun re-attaches and tries again."""
        last = ""
        for attempt in range(DOWNLOAD_TRIES):
            bad: list[int] | None = [] if attempt == DOWNLOAD_TRIES - 1 else None  # last try: take what reads
            try:
                path = await self._save(st, remote, ids, local, bad)
                if bad:
                    self._skipped(st, remote, bad)
                return path
            except (Truncated, ControlError) as exc:
                last = str(exc)
                self.stats["downloads_retried"] += 1
                await asyncio.sleep(min(60.0, min(st.cfg.poll_s, 5.0) * 2**attempt))
        raise BatchUnreadable(
            f"endpoint {st.name!r}: the results of batch {remote.id} could not be read ({last}); "
            "run the same command again later to download them (nothing is paid twice)"
        )

    def _skipped(self, st: _Lane, remote: Remote, bad: list[int]) -> None:
        """Say that unreadable result lines were left out (their items go round again)."""
        self.stats["result_lines_unreadable"] += len(bad)
        where = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(
            f"fair: endpoint {st.name!r}: batch {one_line(remote.id, 100)}: {len(bad)} unreadable "
            f"result line(s) (line {where}) left out after {DOWNLOAD_TRIES} downloads; the other results are "
            f"used and those requests go into a later batch (batch.max_rounds = {st.cfg.max_rounds})",
            file=sys.stderr,
        )

    async def _save(
        self, st: _Lane, remote: Remote, ids: Sequence[str], local: str, bad: list[int] | None = None
    ) -> Path:
        """Download the results to a scratch file and write their outcomes, line by line, to
        ``batches/<local>.results.jsonl`` (fsynced, renamed into place): never all in memory."""
        assert self.journal is not None
        path = self.journal.folder / f"{local}.results.jsonl"
        tmp = path.with_suffix(".tmp")
        with tempfile.TemporaryFile(dir=self.journal.folder) as got, open(tmp, "wb") as f:
            await st.wire.download(remote, got)
            for cid, status, raw in st.wire.parse(file_lines(got), remote, ids, bad):
                if pack(cid) is None:  # not an id we make (nor safe inside this line): not ours
                    continue
                f.write(b'{"c":"%s","s":%d,"b":%s}\n' % (cid.encode(), status, raw or b"null"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def _rows(self, path: Path) -> Iterator[Outcome]:
        """The outcomes saved in ``path``, one line at a time."""
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    r = _row.decode(line)
                    yield r.c, r.s, b"" if bytes(r.b) == b"null" else bytes(r.b)

    async def _hand_out(self, st: _Lane, path: Path, ids: Sequence[str], bid: str, serial: int) -> None:
        """Answer the waiting items of batch ``serial`` from its saved results, letting other tasks
        run every ``HAND_OUT`` items; what the batch did not answer goes round again."""
        items = st.items
        for n, (cid, status, raw) in enumerate(self._rows(path), 1):
            if n % HAND_OUT == 0:
                await asyncio.sleep(0)
            if st.attached:
                st.attached.pop(cid, None)
            if status != TRANSIENT:
                self._resolve(st, cid, status, raw, bid)
            elif (slot := _find(items, cid)) >= 0 and items.batch[slot] == serial:
                self._again(st, slot)
        if st.attached:
            for cid in ids:
                st.attached.pop(cid, None)
        keys = ids.packed() if isinstance(ids, CidList) else filter(None, map(pack, ids))
        for key in keys:  # asked for, but not in the results
            if (slot := items.find(key)) >= 0 and items.batch[slot] == serial:
                self._again(st, slot)

    def _resolve(self, st: _Lane, cid: str, status: int, raw: bytes, bid: str) -> None:
        if status >= 300:  # the server's words only, any key masked: it may be saved and shown
            raw = _enc.encode({"error": {"message": error_message(raw, st.key)}})
        reply = (status, raw, _headers(st, bid))
        slot = _find(st.items, cid)
        if slot >= 0 and st.items.live(slot):
            _deliver(st.items.take(slot), reply)
            return
        if slot >= 0:
            st.items.take(slot)
        self._known[cid] = reply  # for a later send of it

    def _again(self, st: _Lane, slot: int) -> None:
        """An item the batch did not answer: a later batch, or the fallback."""
        items = st.items
        if not items.live(slot):  # its caller went away: nothing to pay for
            items.take(slot)
            return
        items.rounds[slot] += 1
        if items.rounds[slot] < st.cfg.max_rounds:
            self.stats["requeued"] += 1
            if st.retired:  # its key is refused now: the next round goes out with a live key
                self._relocate(st, slot)
            else:
                self._enqueue(st, slot)
            return
        self.stats["gave_up"] += 1
        rounds = items.rounds[slot]
        body = self._body(st, slot) if st.cfg.fallback == "online" else b""
        callers = items.take(slot)
        if st.cfg.fallback == "online":
            self.stats["fallback_online"] += 1
            self._spawn(self._online(st, body, callers))
            return
        msg = (
            f"batch item not answered in {rounds} batch round(s) (expired, canceled or server "
            f"errors; batch.max_rounds = {st.cfg.max_rounds}, batch.fallback = none)"
        )
        _deliver(callers, (422, _enc.encode({"error": {"message": msg}}), {}))

    async def _online(self, st: _Lane, body: bytes, callers: list[tuple[Any, int]]) -> None:
        try:
            live = [other for other in self._pools.get(st.name, ()) if not other.retired]
            target = st.target if not st.retired or not live else live[0].target
            reply: Reply | BaseException = await self.online.send(target, body)
        except Exception as exc:  # SendError: the engine retries it (as a new batch item)
            reply = exc
        _deliver(callers, reply)

    # -- key pools ----------------------------------------------------------------------------

    def _retire(self, st: _Lane, exc: AuthError, serial: int = OPEN) -> None:
        """The Batch API refused ``st``'s key: retire it for the run (one line naming its
        variable) and hand what it had not submitted (its open batch, batch ``serial`` whose
        create it refused) to the live keys. One key, or none left: ``exc`` stops the run."""
        pool = self._pools[st.name]
        if not st.pooled:
            raise exc
        if not st.retired:
            st.retired = True
            self.stats["keys_retired"] += 1
            if (adm := self._admissions.get(st.name)) is not None:
                adm.retired.add(st.index)
            left = sum(not other.retired for other in pool)
            print(
                f"fair: key {st.key_env} retired for this run: {one_line(str(exc), 240)} (Batch API); "
                f"{left} of {len(pool)} keys of endpoint {st.name!r} left",
                file=sys.stderr,
                flush=True,
            )
        if all(other.retired for other in pool):
            envs = ", ".join(other.key_env for other in pool)
            raise AuthError(f"endpoint {st.name!r}: the Batch API refused every key of the pool ({envs})")
        items = st.items
        for slot in [s for s in items.waiting() if items.batch[s] in (OPEN, serial)]:
            self._relocate(st, slot)
        for slot in st.open:  # emptied by ``_relocate`` (``Slots.take``): free them
            items.unlink(slot)
            items.free(slot)
        del st.open[:]
        st.open_bytes = 0

    def _relocate(self, st: _Lane, slot: int) -> None:
        """Move one waiting request of retired ``st`` to a live key (its callers with it)."""
        items = st.items
        packed, rounds = items.key(slot), items.rounds[slot]
        cid, body = unpack(packed), self._body(st, slot)
        live = items.live(slot)
        callers = items.take(slot)
        if not live:  # its caller went away: nothing to send
            return
        self.stats["moved_to_another_key"] += 1
        home = self._home(self._pools[st.name], st.target.slot, cid, packed)
        for waiter, token in callers:
            if waiter is not None and not (isinstance(waiter, asyncio.Future) and waiter.done()):
                self._put(home, cid, packed, body, waiter, token, rounds)

    def _refused_create(
        self, st: _Lane, local: str, ids: CidList, serial: int, exc: AuthError, maybe_made: bool
    ) -> None:
        """A create (or the lookup of a lost one) met refused credentials. Nothing was made:
        its items go to the other keys. Perhaps made (an earlier try lost its reply): never made
        again, its items fail for this run (``_given_up``)."""
        assert self.journal is not None
        if not st.pooled:
            raise exc
        if maybe_made:
            self._given_up(st, local, "", ids, serial, exc)
        else:
            self.journal.write("ended", local, status="key_refused")
        self._retire(st, exc, serial)

    def _given_up(
        self, st: _Lane, local: str, bid: str, ids: Sequence[str], serial: int, exc: AuthError
    ) -> None:
        """A batch made with ``st``'s key that the key can no longer follow (refused now): one line
        naming it; its requests are never made again (nothing is paid twice) and get no record
        (``KeptAtProvider``): the journal keeps the batch, so a rerun once the key works collects it."""
        run, env = self.run_dir, st.key_env
        what = f"batch {one_line(bid, 100)} ({local})" if bid else f"batch {local} (create unanswered)"
        msg = (
            f"endpoint {st.name!r}: {what} was made with key {env}, which the Batch API now refuses "
            f"({one_line(str(exc), 160)}); its {len(ids)} request(s) are not sent again (nothing is "
            f"paid twice): once {env} works, run the same command again to collect them (`fair batches "
            f"list {run}`; `fair batches attach {run} {local} BATCH_ID` if it has no batch id), or "
            f"`fair batches cancel {run} {local}`"
        )
        print(f"fair: {msg}", file=sys.stderr, flush=True)
        self.stats["batches_key_refused"] += 1
        kept = KeptAtProvider(msg)
        for cid in ids:
            st.attached.pop(cid, None)
            if (slot := _find(st.items, cid)) >= 0 and st.items.batch[slot] == serial:
                _deliver(st.items.take(slot), kept)
            else:  # a later send of it (a rerun's request this batch holds) waits for it too
                self._known[cid] = kept

    # -- resume -------------------------------------------------------------------------------

    async def _resume(self) -> None:
        """Re-attach to what an earlier run left at the provider (see the module doc), each batch
        with the key that made it (the journal names its variable)."""
        assert self.journal is not None
        for info in list(self.journal.batches.values()):
            pool = self._pools.get(info.lane)
            if not pool:  # a lane no longer in batch mode: `fair batches list` shows it
                continue
            ended = info.state in ("ended", "ingested")
            rows = self._load(info.results) if ended and info.id and info.results else None
            if rows is not None:  # ended and saved: its answers, no call needed
                self._remember(info.id, rows)
                continue
            if not (info.state in ("creating", "submitted") or (ended and info.id)):
                continue
            st = self._lane_of(pool, info)
            try:
                await self._resume_one(st, info)
            except AuthError as exc:  # its key is refused now: a pool goes on with the others
                if not st.pooled:
                    raise
                self._given_up(st, info.local, info.id, info.ids, NO_BATCH, exc)
                self._retire(st, exc)

    def _lane_of(self, pool: list[_Lane], info: BatchInfo) -> _Lane:
        """The lane of the key that made batch ``info``: a journal without the variable (older
        runs) means the endpoint's one key; a pool that no longer lists it cannot follow it."""
        if not pool[0].pooled or not info.key_env:
            return pool[0]
        for st in pool:
            if st.key_env == info.key_env:
                return st
        raise ConfigError(
            f"endpoint {info.lane!r}: batch {one_line(info.id or info.local, 100)} was made with key "
            f"{info.key_env}, which is not among the endpoint's keys now: list it in `keys` again so "
            f"the run collects that batch (nothing is paid twice), or `fair batches cancel {self.run_dir} "
            f"{info.local}`"
        )

    async def _resume_one(self, st: _Lane, info: BatchInfo) -> None:
        """One batch of an earlier run: find a lost create, follow a running batch, or download
        the results of an ended one again."""
        assert self.journal is not None
        if info.state == "creating":
            found = await self._find(st, info.local, info.t_create, info.n, live=False)
            if found is None and info.status == UNREADABLE and not info.canceled:
                raise BatchAmbiguous(self._unknown_create(st, info.local, "in an earlier run"))
            if found is None:
                self.journal.write("ended", info.local, status="not_created")
                return
            info = self.journal.write("submitted", info.local, id=found.id)
            self.stats["creates_recovered"] += 1
        if info.state == "submitted":
            serial = next(self._serial)
            for cid in info.ids:
                st.attached[cid] = serial
            self.stats["reattached"] += 1
            self._spawn(self._watch(st, info.local, info.id, info.ids, serial))
            return
        try:  # ended but its results were never saved: download again
            remote = await st.wire.retrieve(info.id)
        except ControlError as exc:
            raise FairError(
                f"endpoint {st.name!r}: cannot read batch {info.id} again ({exc}); "
                "its results are needed to avoid paying twice: try again later"
            ) from None
        path = await self._download(st, remote, info.ids, info.local)
        self.journal.write("ended", info.local, id=info.id, status=remote.status, results=path.name)
        self._remember(info.id, self._rows(path))

    def _remember(self, bid: str, rows: Iterable[Outcome]) -> None:
        """The answers of an earlier run's batch, for the sends of them to come."""
        for cid, status, raw in rows:
            if status != TRANSIENT:
                self._known[cid] = (status, raw, {BATCH_HEADER: bid})

    def _load(self, name: str) -> list[Outcome] | None:
        assert self.journal is not None
        try:
            data = (self.journal.folder / name).read_bytes()
            rows = [_row.decode(line) for line in data.splitlines() if line.strip()]
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        return [(r.c, r.s, b"" if bytes(r.b) == b"null" else bytes(r.b)) for r in rows]


def _headers(st: _Lane, bid: str) -> dict[str, str]:
    """A reply's headers: the batch that answered, and the pool key that made it."""
    out = {BATCH_HEADER: bid} if bid else {}
    if st.pooled:
        out[KEY_HEADER] = st.key_env
    return out


def _find(items: Slots, cid: str) -> int:
    """The slot waiting for ``cid``, or -1 (also for an id we never make: not ours)."""
    packed = pack(cid)
    return -1 if packed is None else items.find(packed)


def _deliver(callers: Iterable[tuple[Any, int]], outcome: Reply | BaseException) -> None:
    """Hand ``outcome`` to each caller still waiting: a future, or a streaming caller's sink."""
    for waiter, token in callers:
        if isinstance(waiter, asyncio.Future):
            if waiter.done():
                continue
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)
        elif waiter is not None:
            waiter(token, outcome)
