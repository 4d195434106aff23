"""TOML config -> msgspec Structs. Every error names the file and the field.

A FAIR job config (``fair run``) looks like::

    [run]
    seed = 0

    [dataset]
    name = "gsm8k"            # gsm8k | svamp | strategyqa | logiqa | builtin | jsonl
    split = "test"

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
from typing import Literal, TypeVar

import msgspec

from engine.errors import ConfigError

T = TypeVar("T")


class Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Config sections reject unknown keys, so a typo is an error, not a silent default."""


class EndpointConfig(Struct, kw_only=True):
    """One model behind one base URL, with its price and its limits."""

    provider: Literal["openai", "anthropic", "gemini"] = "openai"
    base_url: str
    model: str
    api_key_env: str | None = None  # name of the env var holding the key; never the key itself
    price_in: float = 0.0  # $ per 1M input tokens
    price_out: float = 0.0  # $ per 1M output tokens
    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    timeout_s: float = 120.0  # wall-clock deadline of one attempt
    max_attempts: int = 6  # retries for 5xx / resets / timeouts
    headers: dict[str, str] = {}
    name: str = ""  # filled from the table key

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        for field in ("rpm", "tpm"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"{field} must be > 0")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

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
    seed: int = 0
    max_in_flight: int = 512  # problems in flight at once (memory bound)
    shard_records: int = 50_000  # records per shard before rotating
    breaker_window: int = 200  # recent problems looked at by the error-rate breaker
    breaker_rate: float = 0.5  # abort when this share of them failed


class DatasetSection(Struct, kw_only=True):
    name: str = "builtin"  # gsm8k | svamp | strategyqa | logiqa | builtin | jsonl | a hub name
    path: str | None = None  # file or folder; default: $FAIR_DATA_DIR or ../shared/datasets
    split: str = "test"
    limit: int | None = None
    offset: int = 0
    task: Literal["numeric", "yesno", "choice"] | None = None  # for jsonl
    fields: dict[str, str] = {}  # jsonl field mapping: id, question, answer, context, options


class StudentSection(Struct, kw_only=True):
    endpoint: str
    attempts: int = 1  # k attempts per problem
    temperature: float = 0.0
    max_tokens: int = 512


class TeachersSection(Struct, kw_only=True):
    endpoints: list[str]
    temperature: float = 0.0
    max_tokens: int = 1024
    review_max_tokens: int = 512


class ReviewSection(Struct, kw_only=True):
    gold_check: Literal["reject", "review-anyway", "record-only", "off"] = "reject"
    threshold: float = 3.0  # accept iff aggregate(valid scores) > threshold
    min_valid: int = 1
    aggregation: Literal["mean", "median", "min"] = "mean"
    early_stop: bool = True
    review_feedback: bool = False


class SamplesSection(Struct, kw_only=True):
    policy: Literal["paper", "all"] = "paper"


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
        known = set(self.endpoints)
        if self.student.endpoint not in known:
            raise ValueError(f"student.endpoint {self.student.endpoint!r} is not in [endpoints]")
        for t in self.teachers.endpoints:
            if t not in known:
                raise ValueError(f"teachers.endpoints: {t!r} is not in [endpoints]")
        if len(self.teachers.endpoints) < 2:
            raise ValueError("teachers.endpoints: peer review needs at least 2 teachers")
        if len(set(self.teachers.endpoints)) != len(self.teachers.endpoints):
            raise ValueError("teachers.endpoints: a teacher is listed twice")


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read and validate a ``fair run`` TOML file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = msgspec.toml.decode(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
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
        raise ConfigError(f"{source}: {str(exc).replace('`$.', '`')}") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


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
