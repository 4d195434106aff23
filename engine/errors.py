"""The engine's exception tree.

FairError
├── ConfigError          bad config: names the file and field            (exit 2)
├── InputError           bad dataset/input line: names file:line         (record skipped)
├── RequestError         one request failed for good (400/404, retries exhausted, bad reply)
│   └── ReplyError       the server answered, but the body is unusable (malformed, empty)
└── AbortRun             the run must stop                               (exit 3)
    ├── AuthError        401/403 from an endpoint
    └── BreakerTripped   sustained error rate
"""

from __future__ import annotations


class FairError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(FairError):
    """A config file or value is invalid. The message names the file and the field."""


class InputError(FairError):
    """One input line is invalid. The message names ``file:line``."""


class RequestError(FairError):
    """A request failed for good; the record it belongs to fails, the run goes on."""

    def __init__(self, message: str, *, status: int | None = None, endpoint: str | None = None):
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint


class ReplyError(RequestError):
    """The server answered but the body cannot be used (malformed JSON, no choices...)."""


class AbortRun(FairError):
    """The whole run must stop (exit code 3)."""


class AuthError(AbortRun):
    """An endpoint refused our credentials (401/403)."""


class BreakerTripped(AbortRun):
    """Too many records failed in a row or in a window: stop instead of burning budget."""
