"""TOML config -> msgspec Structs. Every error names the file and the field.

A FAIR job config (``fair run``) looks like::

    [run]
    seed = 0

    [dataset]
    name = "gsm8k"            # gsm8k | svamp | strategyqa | logiqa | builtin | jsonl
    split = "train"

    [endpoints.gpt]
    provider = "openai"       # openai | anthropic | gemini
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"
    price_in = 0.15           # $ per 1M input tokens
    price_out = 0.60
    rpm = 500

    [student]
    endpoint = "student"

    [teachers]
    endpoints = ["gpt", "claude", "gemini"]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from engine.errors import ConfigError
from engine.fair.scoring import MAX_SCORE, MIN_SCORE

T = TypeVar("T")

# Range-checked types: msgspec enforces them on every load (TOML, dict or CLI flags), and its
# error names the field. NaN fails every bound, so none of these accept it; the upper bounds
# keep a typo (1e9 seconds, 10**12 calls at once) from reaching a sleep or an allocation.
PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=1, le=1_000_000)]  # concurrency, problems in flight, batch sizes
Price = Annotated[float, Meta(ge=0, le=1e6)]  # $ per 1M tokens
Rate = Annotated[float, Meta(gt=0, le=1e12)]  # requests or tokens per minute
Seconds = Annotated[float, Meta(gt=0, le=86_400)]
PosFloat = Annotated[float, Meta(gt=0, le=1e9)]
Weight = Annotated[float, Meta(ge=0, le=1e3)]
Choices = Annotated[int, Meta(ge=1, le=128)]  # n completions per request
Share = Annotated[float, Meta(gt=0, le=1)]
Temperature = Annotated[float, Meta(ge=0, le=2)]
Tokens = Annotated[int, Meta(ge=1, le=10_000_000)]
Attempts = Annotated[int, Meta(ge=1, le=100)]
Port = Annotated[int, Meta(ge=0, le=65_535)]
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_URL = rf"^https?://([^\s/?#@]+@)?(\[[0-9A-Fa-f:.]+\]|[^\s/?#:@\[\]]+)(:{_PORT})?(/\S*)?$"
Url = Annotated[str, Meta(pattern=_URL)]  # http(s)://host[:port 1-65535][/path]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # it travels to servers as a 64-bit int
# an HTTP header: a token name, a value without control characters (no CR/LF injection)
_HEADER_NAME = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
_HEADER_VALUE = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"
HeaderName = Annotated[str, Meta(pattern=_HEADER_NAME)]
HeaderValue = Annotated[str, Meta(pattern=_HEADER_VALUE)]
# msgspec names a failed pattern by its regex; these say it in words
_PATTERN_WORDS = {
    _URL: "an http:// or https:// URL (port 1-65535)",
    _HEADER_NAME: "an HTTP header name (letters, digits, -)",
    _HEADER_VALUE: "a header value without control characters",
}
Name = Annotated[str, Meta(min_length=1)]


class Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Config sections reject unknown keys, so a typo is an error, not a silent default."""


# provider Batch API limits (requests, bytes) a batch may not exceed; Gemini documents no request
# cap (the config's own 1M ceiling holds) and 2 GB per input file (the Files API's limit)
BATCH_LIMITS = {
    "openai": (50_000, 200 * 1024**2),
    "anthropic": (100_000, 256 * 1024**2),
    "gemini": (1_000_000, 2 * 1024**3),
}


class BatchConfig(Struct, kw_only=True):
    """``[endpoints.X.batch]``: how a ``mode = "batch"`` endpoint groups requests into provider
    batches (``engine.request.batch``)."""

    linger_s: Seconds = 5.0  # submit after this long without a new request
    max_items: Count = 10_000  # or at this many requests (at most the provider's limit)
    max_bytes: Annotated[int, Meta(ge=1024, le=256 * 1024**2)] = 100 * 1024**2
    max_open: Annotated[int, Meta(ge=1, le=100)] = 4  # batches at the provider at once
    poll_s: Annotated[float, Meta(ge=0.01, le=3600)] = 30.0
    price_factor: Annotated[float, Meta(gt=0, le=1)] = 0.5  # batch price / online price
    max_rounds: Annotated[int, Meta(ge=1, le=20)] = 3  # batches an item may go through
    fallback: Literal["none", "online"] = "none"  # after max_rounds: fail, or one online call


class EndpointConfig(Struct, kw_only=True):
    """One model behind one base URL, with its price and its limits."""

    provider: Literal["openai", "anthropic", "gemini"] = "openai"
    base_url: Url
    model: Name
    api_key_env: str | None = None  # name of the env var holding the key; never the key itself
    price_in: Price = 0.0  # $ per 1M input tokens
    price_out: Price = 0.0  # $ per 1M output tokens
    concurrency: Count = 64
    rpm: Rate | None = None
    tpm: Rate | None = None
    timeout_s: Seconds = 120.0  # wall-clock deadline of one attempt
    max_attempts: Attempts = 6  # retries for 5xx / resets / timeouts
    max_wait_s: Seconds = 600.0  # ceiling on any pause a server asks for (Retry-After, resets)
    headers: dict[HeaderName, HeaderValue] = {}
    mode: Literal["online", "batch"] = "online"  # batch: the provider's Batch API (engine.request.batch)
    batch: BatchConfig = msgspec.field(default_factory=BatchConfig)
    name: str = ""  # filled from the table key

    def __post_init__(self) -> None:
        if self.mode != "batch":
            return
        items, size = BATCH_LIMITS[self.provider]
        b = self.batch
        for field, value, limit in (("max_items", b.max_items, items), ("max_bytes", b.max_bytes, size)):
            if value > limit:
                raise ValueError(f"batch.{field} = {value} is above {self.provider}'s limit {limit}")

    def api_key(self) -> str | None:
        """Read the key from the environment at call time (it never lives in config or logs)."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            # a key pasted into api_key_env by mistake must not be echoed back
            shown = (
                self.api_key_env
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", self.api_key_env)
                else "(hidden)"
            )
            raise ConfigError(
                f"endpoint {self.name!r}: environment variable {shown} (api_key_env) is not set"
            )
        return key


class RunSection(Struct, kw_only=True):
    seed: Seed = 0
    max_in_flight: Count = 512  # problems in flight at once (memory bound)
    shard_records: PosInt = 50_000  # records per shard before rotating
    breaker_window: Count = 200  # recent problems looked at by the error-rate breaker
    breaker_rate: Share = 0.5  # abort when this share of them failed
    max_cost_usd: Annotated[float, Meta(gt=0, le=1e9)] | None = None  # hard cap (engine.fair.budget)


class DatasetSection(Struct, kw_only=True):
    name: str = "builtin"  # gsm8k | svamp | strategyqa | logiqa | builtin | jsonl | a hub name
    path: str | None = None  # file or folder; default: $FAIR_DATA_DIR or ../shared/datasets
    split: str = "train"  # collect mistakes on the train split (the paper's); eval scores test
    limit: NonNegInt | None = None
    offset: NonNegInt = 0
    task: Literal["numeric", "yesno", "choice"] | None = None  # for jsonl
    fields: dict[str, str] = {}  # jsonl field mapping: id, question, answer, context, options


class StudentSection(Struct, kw_only=True):
    endpoint: str
    attempts: Attempts = 1  # k attempts per problem
    temperature: Temperature = 0.0
    top_p: Share | None = None  # nucleus sampling (the paper: 0.9 at temperature 0.3)
    max_tokens: Tokens = 512
    # round 2 (engine.fair.student_server): `fair run` serves this LoRA adapter itself, at the student
    # endpoint's loopback address and under its model name, and stops the server at the end
    adapter: Name | None = None
    model: Name | None = None  # the base model under the adapter (default: the embedded SmolLM2)
    server: Literal["auto", "cpu", "vllm"] = "auto"  # auto: `vllm serve` when vllm is installed


class TeachersSection(Struct, kw_only=True):
    endpoints: list[str]
    temperature: Temperature = 0.0
    max_tokens: Tokens = 1024
    review_max_tokens: Tokens = 512


class ReviewSection(Struct, kw_only=True):
    gold_check: Literal["reject", "review-anyway", "record-only", "off"] = "reject"
    # accept iff aggregate(valid scores) > threshold: below MIN_SCORE everything passes, at
    # MAX_SCORE nothing can
    threshold: Annotated[float, Meta(ge=MIN_SCORE, lt=MAX_SCORE)] = 3.0
    min_valid: PosInt = 1  # at most the number of reviewers (teachers - 1): checked in validate()
    # calibrated: each reviewer's scores standardised against its own scores in the run first
    aggregation: Literal["mean", "median", "min", "calibrated"] = "mean"
    early_stop: bool = True
    review_feedback: bool = False


class SamplesSection(Struct, kw_only=True):
    policy: Literal["paper", "all"] = "paper"
    answer_line: bool = True  # append "The answer is X." to accepted rationales that lack one


class RunConfig(Struct, kw_only=True):
    run: RunSection = msgspec.field(default_factory=RunSection)
    dataset: DatasetSection = msgspec.field(default_factory=DatasetSection)
    endpoints: dict[str, EndpointConfig]
    student: StudentSection
    teachers: TeachersSection
    review: ReviewSection = msgspec.field(default_factory=ReviewSection)
    samples: SamplesSection = msgspec.field(default_factory=SamplesSection)
    prompts: str = "v1"  # prompt template version

    def __post_init__(self) -> None:
        for name, ep in self.endpoints.items():
            ep.name = name
        validate(self)


def validate(cfg: RunConfig) -> None:
    """The rules that span fields (single values are range-checked by their types). ValueError
    naming the field; msgspec turns it into a ValidationError, ``convert_config`` names the file."""
    known = set(cfg.endpoints)
    if cfg.student.endpoint not in known:
        raise ValueError(f"student.endpoint {cfg.student.endpoint!r} is not in [endpoints]")
    if cfg.student.adapter is not None:  # round 2: the run serves the student itself
        from engine.fair.student_server import endpoint_address

        endpoint_address(cfg)
    teachers = cfg.teachers.endpoints
    for t in teachers:
        if t not in known:
            raise ValueError(f"teachers.endpoints: {t!r} is not in [endpoints]")
    if len(teachers) < 2:
        raise ValueError("teachers.endpoints: peer review needs at least 2 teachers")
    if len(set(teachers)) != len(teachers):
        raise ValueError("teachers.endpoints: a teacher is listed twice")
    reviewers = len(teachers) - 1  # every other teacher reviews a rationale
    if cfg.review.min_valid > reviewers:
        raise ValueError(
            f"review.min_valid = {cfg.review.min_valid} but a rationale has only {reviewers} "
            f"reviewer(s) (teachers - 1): no rationale could ever be judged"
        )
    from engine.fair.prompts import versions as prompt_versions  # lazily: the prompts import the schema

    if cfg.prompts not in (known_prompts := prompt_versions()):
        raise ValueError(f"prompts: unknown version {cfg.prompts!r} (have {', '.join(known_prompts)})")


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read and validate a ``fair run`` TOML file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = msgspec.toml.decode(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {_short(exc)}") from None
    if overrides:
        raw = _merge(raw, overrides)
    return convert_config(raw, RunConfig, source=str(path))


def convert_config(raw: dict, kind: type[T], *, source: str) -> T:
    """Validate a decoded mapping into ``kind``; msgspec's ``$.a.b`` path becomes ``a.b``."""
    endpoints = raw.get("endpoints") if isinstance(raw, dict) else None
    if isinstance(endpoints, dict):  # msgspec cannot name dict keys in its paths: check each here
        for name, ep in endpoints.items():
            convert_config(ep, EndpointConfig, source=f"{source}: endpoints.{name}")
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_readable(exc)}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(f"{source}: {_short(exc)}") from None


def check_output_dir(path: Path, flag: str) -> Path:
    """A run directory we can create or write: ConfigError naming ``flag`` when it is a file,
    lies under a file, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a run directory")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable")
    return path


def convert_flags(values: dict, kind: type[T], *, command: str, flags: dict[str, str]) -> T:
    """Command-line values into a config Struct, so flags obey the same range checks as TOML;
    the error names the flag (``flags`` maps field -> ``--flag``) instead of the field."""
    try:
        return msgspec.convert({k: v for k, v in values.items() if v is not None}, kind)
    except (msgspec.ValidationError, ValueError) as exc:
        text = _readable(exc)
        for field, flag in flags.items():
            text = text.replace(f"`$.{field}`", flag).replace(f"`{field}`", flag)
        raise ConfigError(f"{command}: {text}") from None


def _readable(exc: msgspec.ValidationError) -> str:
    """msgspec's message with ``$.a.b`` as ``a.b`` and the URL regex said in words."""
    text = str(exc).replace("`$.", "`")
    for pattern, words in _PATTERN_WORDS.items():
        text = text.replace(f"`str` matching regex {pattern!r}", words)
    return text


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def dump_config(cfg: msgspec.Struct) -> bytes:
    """The resolved config as TOML. Only env var *names* are in it, never key values."""
    return msgspec.toml.encode(_drop_none(msgspec.to_builtins(cfg)))


def _drop_none(value):
    """TOML has no null: unset optional fields are left out (they load back as None)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
