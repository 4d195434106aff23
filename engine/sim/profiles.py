"""Simulator profiles: which models a simulated server hosts and how each one behaves.

A profile is a TOML file (named ones live in ``engine/sim/profiles/``)::

    name = "committee"
    seed = 0
    default_model = "gpt-sim"          # serves requests for unknown model names (omit: 404)

    [models.gpt-sim]
    content = "reasoning"              # echo | reasoning | replay
    latency_ms = 800                   # median; with latency_sigma > 0 the latency is lognormal
    latency_sigma = 0.4
    rpm = 600                          # hidden limits, enforced with 429 + x-ratelimit-* headers
    tpm = 200000
    limit_shape = "bucket"             # bucket | fixed_window | sliding_window
    limit_headers = true               # false: no x-ratelimit-* at all, 429s carry Retry-After: 1 only
    skill = 0.85                       # rate of right final answers
    leniency = 0.3                     # reviewer bias: + gives higher scores, - harsher

    thinking = true                    # a reasoning model: bills thinking tokens, returns reasoning
    sampling = false                   # refuses temperature/top_p (400 naming the parameter)

    [models.gpt-sim.faults]
    p_5xx = 0.01                       # each a per-request probability
    bursts = [{kind = "5xx", every_s = 20, duration_s = 2}]

    [keys.a]                           # optional, instead of api_key: the keys it accepts (the
    value = "sk-sim-a-0123456789"      # label is shown in /stats, the value never)
    group = "org-a"                    # its organisation (omit: its own); see engine.sim.keys
    rpm = 1000                         # hidden per-key limits (tpm, limit_shape; limit_headers = false)
    revoke_after_s = 12.5              # refused (401) from then on; revoke_after_requests likewise

    [groups.org-a]
    rpm = 1500                         # hidden per-organisation limits shared by its keys

Every field has a default, so ``[models.echo]`` alone is a valid (instant, echoing) model.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from fairdistill.engine.errors import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"

ContentMode = Literal["echo", "reasoning", "replay"]
LimitShape = Literal["bucket", "fixed_window", "sliding_window"]
FaultKind = Literal["5xx", "429", "hang", "reset", "malformed", "truncated", "empty", "length"]


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Profile sections reject unknown keys: a typo is an error, not a silent default."""


class Burst(_Struct):
    """A fault that hits every request for ``duration_s`` seconds once every ``every_s`` seconds."""

    kind: FaultKind = "5xx"
    every_s: float = 20.0
    duration_s: float = 2.0
    offset_s: float = 0.0  # seconds after server start the first burst begins


class Faults(_Struct):
    """Per-request fault probabilities (drawn independently of content, in this order)."""

    p_5xx: float = 0.0  # 500/502/503 with an OpenAI-style error body
    p_hang: float = 0.0  # never answers (sleeps ``hang_s``, cancelled when the client goes away)
    p_reset: float = 0.0  # connection closed without a response
    p_malformed: float = 0.0  # 200 with a body that is not JSON
    p_truncated: float = 0.0  # 200 with a JSON body cut in the middle
    p_empty: float = 0.0  # 200 with ``choices: []``
    p_length: float = 0.0  # content cut short, ``finish_reason: "length"``
    hang_s: float = 300.0
    bursts: list[Burst] = []

    def any(self) -> bool:
        return bool(self.bursts) or any(
            p > 0
            for p in (
                self.p_5xx,
                self.p_hang,
                self.p_reset,
                self.p_malformed,
                self.p_truncated,
                self.p_empty,
                self.p_length,
            )
        )


class ModelProfile(_Struct):
    """How one simulated model behaves."""

    content: ContentMode = "echo"
    role: Literal["teacher", "student"] = "teacher"
    latency_ms: float = 0.0  # fixed latency, or the median when latency_sigma > 0
    latency_sigma: float = 0.0  # sigma of the lognormal latency (0 = fixed)
    latency_max_ms: float = 120_000.0
    rpm: float | None = None  # hidden request limit (token bucket, refilled continuously)
    tpm: float | None = None  # hidden token limit (prompt + completion tokens)
    limit_burst_s: float = 60.0  # bucket capacity, in seconds of refill (60 = a per-minute bucket)
    # how the limits are enforced: a token bucket (of limit_burst_s depth), or a window of
    # limit_window_s counting what was let through, fixed (from server start, reset by /reset)
    # or sliding (the last limit_window_s seconds, counted in 0.1 s bins)
    limit_shape: LimitShape = "bucket"
    limit_window_s: float = 60.0
    # False: replies carry no x-ratelimit-* headers at all and a 429 only ``Retry-After: 1``
    # (a gateway that hides its limits); the client must discover them from 429s alone
    limit_headers: bool = True
    faults: Faults = msgspec.field(default_factory=Faults)
    # reasoning content
    skill: float = 0.8  # probability that a solution ends in the right answer
    feedback_error_rate: float = 0.05  # feedback (gold given as a hint) that still ends wrong
    leniency: float = 0.0  # added to review scores before rounding (+ lenient, - harsh)
    review_noise: float = 0.6  # sigma of the gaussian noise on review scores
    invalid_review_rate: float = 0.0  # reviews whose score cannot be parsed
    # replay content: whose recorded text this model serves ("gpt" | "gemini" | "mistral")
    replay_author: str | None = None
    echo_chars: int = 48  # echo content: this many characters of the last message
    # what the model accepts, as its provider checks it (an unknown or refused parameter is a 400
    # naming it, in that provider's error shape; see engine.sim.strict)
    sampling: bool = True  # False: refuses temperature/top_p/top_k (OpenAI: any but the default 1)
    refuses: list[str] = []  # more parameters this model refuses (an OpenAI reasoning model: max_tokens)
    accepts: list[str] = []  # extra OpenAI-wire parameters taken (a vLLM-like server: top_k, ...)
    # a reasoning model: thinks before it answers and bills the thinking as output tokens
    thinking: bool = False
    thinking_tokens: int = 96  # per choice at medium effort (capped by a budget the request sets)
    # OpenAI wire: the message field carrying the reasoning text ("": none, as OpenAI's own API;
    # "reasoning_content" or "reasoning": a vLLM-like server serving an open reasoning model)
    reasoning_field: Literal["", "reasoning_content", "reasoning"] = ""
    prompt_cache: bool = False  # repeated message prefixes are billed as cached input tokens
    cache_min_tokens: int = 0  # a prefix shorter than this is never cached (OpenAI: 1024)


class KeyProfile(_Struct):
    """One API key the simulator accepts (``[keys.LABEL]``; the label is shown, the value never):
    its organisation, its own hidden limits and when it is revoked."""

    value: str  # what the client sends
    group: str | None = None  # its organisation; None: the key is its own (named by its label)
    rpm: float | None = None  # hidden per-key limits, like a model's
    tpm: float | None = None
    limit_headers: bool = False  # True: x-ratelimit-* of this limit on the OpenAI wire
    limit_shape: LimitShape = "bucket"
    limit_burst_s: float = 60.0
    limit_window_s: float = 60.0
    revoke_after_s: float | None = None  # refused (401) from this long after server start
    revoke_after_requests: int | None = None  # refused after this many requests carrying it

    def __repr__(self) -> str:  # the value is a secret: never in a log or a traceback
        return f"KeyProfile(group={self.group!r}, rpm={self.rpm!r}, tpm={self.tpm!r})"


class GroupProfile(_Struct):
    """An organisation's hidden limits (``[groups.NAME]``), shared by all of its keys."""

    rpm: float | None = None
    tpm: float | None = None
    limit_headers: bool = False
    limit_shape: LimitShape = "bucket"
    limit_burst_s: float = 60.0
    limit_window_s: float = 60.0


def check_keys(keys: dict[str, KeyProfile], groups: dict[str, GroupProfile]) -> None:
    """Key and group tables that mean one thing: distinct non-empty values, organisations that
    exist, limits and revocations that are positive (``ValueError`` naming the field)."""
    seen: dict[str, str] = {}
    for label, k in keys.items():
        if not k.value:
            raise ValueError(f"keys.{label}.value: must not be empty")
        if k.value in seen:
            raise ValueError(f"keys.{label}.value: the same value as keys.{seen[k.value]}")
        seen[k.value] = label
        if k.group is not None and k.group in keys and keys[k.group].group is None:
            raise ValueError(f"keys.{label}.group: {k.group!r} is key {k.group}'s own organisation")
        for field in ("rpm", "tpm", "revoke_after_s", "revoke_after_requests"):
            if (v := getattr(k, field)) is not None and v < 0:
                raise ValueError(f"keys.{label}.{field}: must be >= 0")
    used = {k.group for k in keys.values()}
    for name, g in groups.items():
        if name not in used:
            raise ValueError(f"groups.{name}: no key has group = {name!r}")
        if any(v is not None and v < 0 for v in (g.rpm, g.tpm)):
            raise ValueError(f"groups.{name}: rpm and tpm must be >= 0")


class SimProfile(_Struct):
    """A simulated server: its models, plus the seed that makes its content deterministic."""

    name: str = "custom"
    seed: int = 0
    models: dict[str, ModelProfile] = msgspec.field(default_factory=lambda: {"sim": ModelProfile()})
    default_model: str | None = None  # profile used for unknown model names; None -> 404
    dataset: str | None = None  # problems for reasoning content (loaded by `fair sim`)
    replay_dir: str | None = None  # datasets folder for replay; default $FAIR_DATA_DIR or ../shared/datasets
    api_key: str | None = None  # when set, requests must send "Authorization: Bearer <api_key>" (else 401)
    # several keys instead (see engine.sim.keys): each request must carry one of their values
    keys: dict[str, KeyProfile] = {}
    groups: dict[str, GroupProfile] = {}

    def __post_init__(self) -> None:
        if self.keys and self.api_key is not None:
            raise ValueError("api_key and [keys] are exclusive (put the one key in [keys])")
        if self.groups and not self.keys:
            raise ValueError("[groups] needs [keys]")
        check_keys(self.keys, self.groups)
        if not self.models:
            raise ValueError("sim profile: at least one [models.NAME] table is needed")
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"sim profile: default_model {self.default_model!r} is not in [models]")

    def model(self, name: str) -> ModelProfile | None:
        found = self.models.get(name)
        if found is None and self.default_model is not None:
            return self.models[self.default_model]
        return found


def named_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> SimProfile:
    """A named profile (``fast``, ``committee``...) or a TOML file path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"sim: unknown profile {name_or_path!r} (have {named_profiles()} or FILE.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"sim profile {path}: {exc}") from exc
    return profile_from_dict(data, source=str(path))


def profile_from_dict(data: dict, source: str = "profile") -> SimProfile:
    try:
        for table, kind in (("keys", KeyProfile), ("groups", GroupProfile)):
            entries = data.get(table)
            for label, entry in entries.items() if isinstance(entries, dict) else ():
                try:  # one by one, so that an error names the key or group
                    msgspec.convert(entry, kind)
                except msgspec.ValidationError as exc:
                    raise ValueError(f"{table}.{label}: {exc}") from exc
        return msgspec.convert(data, SimProfile)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"sim profile {source}: {exc}") from exc
