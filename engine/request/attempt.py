"""The retry boundary and one attempt of a call: admission, send, classify.

``Sender.call(lane, call, request, key)`` runs one logical call through ``retrying``
(``engine.request.retry``); each attempt takes a lease from the lane's admission, sends the
provider's body to the lane's ``Target`` through the executor, and reads the answer by the one
status table (``engine.request.providers.status``): a 2xx is decoded, a 429 goes back to
admission (not an attempt), a 400 naming a parameter the model refuses drops it and sends again,
401/403 abort the run (``aborted`` is then set: later calls fail at once), a 5xx or an unusable
body is retried, another 4xx fails the record. The engine (``engine.request.client``) does the
cache, single-flight and fan-out around it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from fairdistill.engine.errors import AuthError, ReplyError, RequestError, one_line
from fairdistill.engine.request.events import Call, Events
from fairdistill.engine.request.executor import BATCH_HEADER, KEY_HEADER, Executor, SendError
from fairdistill.engine.request.lane import Lane, settle
from fairdistill.engine.request.providers import error_message, redact
from fairdistill.engine.request.providers.status import Verdict, classify
from fairdistill.engine.request.retry import Transient, retrying
from fairdistill.engine.types import ChatRequest, Completion


class Sender:
    """Sends the calls of one engine (its executor and events); remembers an abort."""

    __slots__ = ("aborted", "events", "executor", "max_rate_limited")

    def __init__(self, executor: Executor, events: Events, max_rate_limited: int):
        self.executor = executor
        self.events = events
        self.max_rate_limited = max_rate_limited  # 429s one call may receive before it gives up
        self.aborted: AuthError | None = None

    async def call(self, lane: Lane, call: Call, request: ChatRequest, key: str) -> Completion:
        """One logical call through the retry boundary; maps the way it ended to an error.
        ``key`` (the cache key in hex) names the request to the executor."""
        try:
            done = await retrying(
                lane.policy, self._attempt, lane, call, request, key, on_retry=self._retried
            )
        except Transient as exc:
            err_cls = ReplyError if exc.reply_error else RequestError
            error: Exception = err_cls(
                f"endpoint {lane.name!r}: gave up after {call.attempts} attempts: {exc}",
                status=exc.status or None,
                endpoint=lane.name,
            )
        except AuthError as exc:
            self.aborted = error = exc
        except RequestError as exc:
            error = exc
        else:
            return settle(self.events, lane, call, done)
        for hook in self.events.failed:
            hook(call, error)
        raise error from None

    def _retried(self, lane: Lane, call: Call, request: ChatRequest, key: str) -> None:
        for hook in self.events.retried:
            hook(call)

    async def _attempt(self, lane: Lane, call: Call, request: ChatRequest, key: str) -> Completion:
        """One attempt: admission, send, classify (``providers.status``). 429s, and 400s naming
        a parameter the model does not take (dropped, then sent again), loop back into admission
        in here; the lease is released and the exchange accounted in one place, the ``finally``."""
        admission, events = lane.admission, self.events
        call.attempts += 1
        while True:
            body = lane.provider.encode(request)  # again after a drop: what the model takes now
            lease = await admission.acquire(call.est_tokens, call.affinity)
            target = lane.targets[admission.key_of(lease)] if lane.pooled else lane.target
            call.key_env = target.key_env if lane.pooled else None
            for hook in events.admitted:
                hook(call)
            call.status, call.timed_out = 0, False
            headers: Mapping[str, str] | None = None
            used: int | None = None
            for hook in events.sent:
                hook(call)
            try:
                status, raw, reply_headers = await self.executor.send(target, body, lane.send_key(key))
                call.status = status
                call.batch = reply_headers.get(BATCH_HEADER)
                call.key_env = reply_headers.get(KEY_HEADER, call.key_env)  # a batch of another key
                headers = lane.provider.limits(reply_headers)
                if status < 300:
                    done = lane.provider.decode(raw)
                    used = done.usage.prompt_tokens + done.usage.completion_tokens
                    return done
                if status == 429:
                    self._throttled(lane, call, raw)
                    continue
                if status == 400 and lane.dropped(call, request, body, raw):
                    continue
                if lane.pooled and classify(status, raw) is Verdict.ABORT:
                    call.refused = (*call.refused, call.key_env or "")  # the trace's `refused`
                    if self._retired(lane, lease, raw):
                        continue  # that key is retired: again on another
                raise lane.refusal(status, raw)
            except SendError as exc:
                call.timed_out = exc.timeout
                raise Transient(redact(str(exc), lane.secrets)) from None
            except ReplyError as exc:
                raise Transient(redact(str(exc), lane.secrets), call.status, reply_error=True) from None
            finally:
                if used is None:
                    admission.release(lease, call.status, headers)
                else:
                    admission.release(lease, call.status, headers, used)
                for hook in events.answered:
                    hook(call)

    def _retired(self, lane: Lane, lease: object, raw: bytes) -> bool:
        """A pool key refused the credentials: retire it (said once, naming its variable) and
        say whether another key is left to send the call on."""
        newly, left = lane.admission.retire(lease)
        if newly:
            env = lane.targets[lane.admission.key_of(lease)].key_env
            print(
                f"fair: endpoint {lane.name!r}: key {env} was refused "
                f"({one_line(error_message(raw, lane.secrets), 160)}); retired for this run, "
                f"{left} of {len(lane.targets)} keys left",
                file=sys.stderr,
                flush=True,
            )
        return left > 0

    def _throttled(self, lane: Lane, call: Call, raw: bytes) -> None:
        """A 429: back to admission (not an attempt), at most ``max_rate_limited`` times a call."""
        call.http_429 += 1
        for hook in self.events.throttled:
            hook(call)
        if call.http_429 >= self.max_rate_limited:
            raise RequestError(
                f"endpoint {lane.name!r}: still rate limited (429) after {call.http_429} "
                f"tries: {error_message(raw, lane.secrets)}",
                status=429,
                endpoint=lane.name,
            )
