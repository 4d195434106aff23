"""The one table of what an HTTP answer means, for every wire and both executors.

``classify(status, body)`` maps a reply to a ``Verdict``; the online engine
(``engine.request.client``), the Batch API items and control calls (``engine.request.batch``)
and admission all read it here, so a status means the same thing everywhere::

    2xx                         OK         decode the body (an unusable one is retried)
    429                         ADMISSION  back to admission: cut the rate, honour Retry-After
    401, 403, Gemini's 400
      ``API_KEY_INVALID``       ABORT      the credentials were refused: the run stops (exit 3)
    408, 5xx (520-529 too)      RETRY      tried again with backoff (a batch item: a later batch)
    other 4xx                   FAIL       the record fails with the server's message (a 400
                                           naming a parameter is first dropped: ``accepts``)
"""

from __future__ import annotations

import enum

RETRY_STATUS = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


class Verdict(enum.IntEnum):
    """What a reply's status (and, for refused credentials, its body) means."""

    OK = 0
    RETRY = 1
    ADMISSION = 2
    FAIL = 3
    ABORT = 4


def refused_credentials(status: int, body: bytes) -> bool:
    """401/403, or Google's 400 ``API_KEY_INVALID`` (how Gemini answers a wrong key)."""
    return status in (401, 403) or (status == 400 and b'"API_KEY_INVALID"' in body[:8192])


def classify(status: int, body: bytes = b"") -> Verdict:
    """The verdict on one HTTP answer (``status`` > 0; no answer at all is the executor's
    ``SendError``, retried like ``RETRY``)."""
    if status < 300:
        return Verdict.OK
    if status == 429:
        return Verdict.ADMISSION
    if refused_credentials(status, body):
        return Verdict.ABORT
    if status in RETRY_STATUS or status >= 500:
        return Verdict.RETRY
    return Verdict.FAIL


def again_later(status: int) -> bool:
    """Whether a Batch API item or control call answered ``status`` is worth trying again
    later (a later batch, the next poll) rather than failing: RETRY and ADMISSION."""
    return classify(status) in (Verdict.RETRY, Verdict.ADMISSION)
