"""The engine's exception tree.

FairError
├── ConfigError          bad config or flag: names the file and field    (exit 2)
├── UsageError           a path that cannot be used (a file where a folder goes...)  (exit 2)
│   └── DamagedRunError  an unreadable line in a run directory: names file:line, says
│                        `fair repair RUN_DIR`                            (exit 2)
├── InputError           bad dataset/input line: names file:line         (record skipped)
├── RequestError         one request failed for good (400/404, retries exhausted, bad reply)
│   ├── ReplyError       the server answered, but the body is unusable (malformed, empty)
│   └── Blocked          the provider refused the prompt itself (a safety block): not retried
└── AbortRun             the run must stop                               (exit 3)
    ├── AuthError        401/403 from an endpoint
    └── BreakerTripped   sustained error rate
"""

from __future__ import annotations

import re


class FairError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(FairError):
    """A config file or value is invalid. The message names the file and the field."""


class UsageError(FairError):
    """A path or argument that cannot be used as given (exit code 2)."""


class DamagedRunError(UsageError):
    """A run directory holds a line or manifest that cannot be read. Names ``file:line``."""

    def __init__(self, where: str, why: str, run_dir: str):
        super().__init__(f"{where}: damaged run directory ({why}); run `fair repair {run_dir}` to fix it")
        self.where = where
        self.run_dir = run_dir


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


class Blocked(RequestError):
    """The provider blocked the prompt (Gemini ``promptFeedback.blockReason``): sending it again
    would be blocked again, so the record fails at once, saying why."""


class AbortRun(FairError):
    """The whole run must stop (exit code 3, or a subclass's ``exit_code``)."""

    exit_code = 3


class AuthError(AbortRun):
    """An endpoint refused our credentials (401/403)."""


class BreakerTripped(AbortRun):
    """Too many records failed in a row or in a window: stop instead of burning budget."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def one_line(text: str, limit: int = 500) -> str:
    """``text`` safe to print on one terminal line: newlines and tabs become spaces, other
    control characters (ESC, BEL, bidi overrides...) are shown as ``\\xNN`` escapes, and it is
    cut at ``limit`` characters. For anything that may echo what a server or a file sent."""
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\t", " ")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else "?", text)
    return text if len(text) <= limit else text[:limit] + "..."
