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
    model = "gpt-5-mini"
    api_key_env = "OPENAI_API_KEY"
    price_in = 0.25           # $ per 1M input tokens
    price_cached_in = 0.025   # cached input (default: price_in)
    price_out = 2.00          # thinking tokens are billed as output
    reasoning = { effort = "low" }   # sent only to models that take it (engine/accepts.py)
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
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from fairdistill.engine.accepts import check_endpoint  # the model table (a pure module)
from fairdistill.engine.errors import ConfigError

T = TypeVar("T")
MIN_SCORE, MAX_SCORE = 1, 5  # a peer review's valid scores (engine.fair.scoring reads them here)
PROMPTS_DIR = Path(__file__).parent / "fair" / "prompts"  # the shipped prompt versions, one folder each
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

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
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_GROUP_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"
_PATTERN_WORDS = {
    _ENV_NAME: "an environment variable's name (letters, digits, _)",
    _GROUP_NAME: "a group name (letters, digits, _ . : -)",
    _URL: "an http:// or https:// URL (port 1-65535)",
    _HEADER_NAME: "an HTTP header name (letters, digits, -)",
    _HEADER_VALUE: "a header value without control characters",
}
Name = Annotated[str, Meta(min_length=1)]


def doc(text: str) -> Meta:
    """A field's one-sentence description: the reference docs, `fair init` comments and
    ``msgspec.json.schema`` all read it."""
    return Meta(description=text)


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

    linger_s: Annotated[
        Seconds, doc("Submit the open batch after this many seconds without a new request.")
    ] = 5.0
    max_items: Annotated[
        Count,
        doc(
            "Submit the open batch at this many requests (at most the provider's limit: 50,000 OpenAI, "
            "100,000 Anthropic)."
        ),
    ] = 10_000
    max_bytes: Annotated[
        int,
        Meta(ge=1024, le=256 * 1024**2),
        doc("Submit the open batch at this many bytes (at most 200 MB OpenAI, 256 MB Anthropic)."),
    ] = 100 * 1024**2
    max_open: Annotated[
        int,
        Meta(ge=1, le=100),
        doc("Batches at the provider at once; the open one keeps growing meanwhile."),
    ] = 4
    poll_s: Annotated[
        float, Meta(ge=0.01, le=3600), doc("Seconds between status polls of a submitted batch.")
    ] = 30.0
    price_factor: Annotated[
        float,
        Meta(gt=0, le=1),
        doc("Batch price as a share of the online price: cost = usage x price x price_factor."),
    ] = 0.5
    max_rounds: Annotated[
        int,
        Meta(ge=1, le=20),
        doc("Batches an item may go through: expired, canceled or 5xx items go into a later one."),
    ] = 3
    fallback: Annotated[
        Literal["none", "online"],
        doc("After max_rounds: `none` fails the record (exit 1), `online` sends it once online."),
    ] = "none"
    max_poll_failures: Annotated[
        int,
        Meta(ge=1, le=10_000),
        doc(
            "Status polls of a batch that may fail in a row (404, 5xx, an unreadable reply) before the run "
            "stops (exit 1), naming the batch."
        ),
    ] = 20
    deadline_s: Annotated[
        float,
        Meta(gt=0, le=30 * 86400),
        doc("Seconds a run waits for one submitted batch to end before it stops (exit 1), naming the batch."),
    ] = 48 * 3600.0


class AcceptsConfig(Struct, kw_only=True):
    """``[endpoints.X.accepts]``: overrides of what the model takes (the table in
    ``engine.accepts``); an unset field keeps the table's value."""

    temperature: Annotated[bool | None, doc("Send `temperature` (false for models that refuse it).")] = None
    top_p: Annotated[bool | None, doc("Send `top_p` (nucleus sampling).")] = None
    n: Annotated[bool | None, doc("Send `n` (false: the engine makes n separate calls).")] = None
    seed: Annotated[bool | None, doc("Send `seed`.")] = None
    stop: Annotated[bool | None, doc("Send stop sequences.")] = None
    token_limit: Annotated[
        Literal["max_tokens", "max_completion_tokens"] | None,
        doc("OpenAI wire only: the name of the completion-token limit (default `max_completion_tokens`)."),
    ] = None
    reasoning: Annotated[
        bool | None,
        doc("The model takes reasoning controls (`reasoning_effort`, `thinking`, `thinkingConfig`)."),
    ] = None


class ReasoningConfig(Struct, kw_only=True):
    """``[endpoints.X.reasoning]``: one vocabulary for every wire's reasoning controls."""

    effort: Annotated[
        Literal["none", "minimal", "low", "medium", "high"] | None,
        doc(
            "OpenAI `reasoning_effort`, Gemini `thinkingLevel` (`none`: thinkingBudget 0); on Anthropic "
            "a thinking budget of 1024/1024/4096/16384 tokens (minimal/low/medium/high)."
        ),
    ] = None
    budget_tokens: Annotated[
        Tokens | None,
        doc(
            "Thinking tokens allowed on top of the answer's max_tokens (Anthropic `thinking.budget_tokens`, "
            "at least 1024; Gemini `thinkingBudget`; OpenAI: added to `max_completion_tokens`)."
        ),
    ] = None
    include_thoughts: Annotated[
        bool | None,
        doc(
            "Keep the model's reasoning text on the record (Gemini: `includeThoughts`); "
            "false: the engine drops it."
        ),
    ] = None


EnvName = Annotated[str, Meta(pattern=_ENV_NAME)]  # a variable's name, never a key
GroupName = Annotated[str, Meta(pattern=_GROUP_NAME)]


class KeyConfig(Struct, kw_only=True):
    """One key of an endpoint's pool (``keys = [{ env = ..., group = ... }]``): its variable, the
    organisation it bills, and its own limits."""

    env: Annotated[EnvName, doc("Name of the environment variable holding this key (never the key itself).")]
    group: Annotated[
        GroupName | None,
        doc("Organisation or project whose quota it shares with the group's other keys; unset: its own."),
    ] = None
    rpm: Annotated[
        Rate | None, doc("This key's requests per minute; unset: learned from its own 429s and headers.")
    ] = None
    tpm: Annotated[
        Rate | None, doc("This key's tokens per minute; unset: learned from its own 429s and headers.")
    ] = None

    @property
    def group_name(self) -> str:
        """The organisation whose quota and prompt cache the key shares (its own when unset)."""
        return self.group if self.group is not None else self.env


class GroupConfig(Struct, kw_only=True):
    """``groups = { NAME = { rpm = ... } }``: the quota the keys of one organisation share."""

    rpm: Annotated[Rate | None, doc("Requests per minute of the whole group, across its keys.")] = None
    tpm: Annotated[Rate | None, doc("Tokens per minute of the whole group, across its keys.")] = None


class EndpointConfig(Struct, kw_only=True):
    """One model behind one base URL, with its price and its limits."""

    provider: Annotated[
        Literal["openai", "anthropic", "gemini"],
        doc(
            "Wire protocol: OpenAI-compatible chat completions, Anthropic Messages or Gemini generateContent."
        ),
    ] = "openai"
    base_url: Annotated[
        Url,
        doc(
            "Base URL of the API, e.g. `https://api.openai.com/v1`, or `http://127.0.0.1:8900/v1` for `fair "
            "sim`."
        ),
    ]
    model: Annotated[Name, doc("Model name sent with every request.")]
    api_key_env: Annotated[
        str | None,
        doc(
            "Name of the environment variable holding the API key (read at call time; never the key itself)."
        ),
    ] = None
    keys: Annotated[
        list[KeyConfig],
        doc(
            'A pool of keys instead of `api_key_env`: `[{ env = "KEY_A", group = "org-a", rpm = 5000 }, '
            "...]`; each is used within its own and its group's limits."
        ),
    ] = []
    groups: Annotated[
        dict[GroupName, GroupConfig],
        doc("Limits of the pool's groups, e.g. `{ org-a = { rpm = 1500 } }`; unset: learned per key."),
    ] = {}
    key_affinity: Annotated[
        bool,
        doc(
            "With `keys`: the requests of one problem keep to one key while it has headroom, so the "
            "provider's prompt cache (per organisation) still hits; false: each goes to the freest key."
        ),
    ] = True
    price_in: Annotated[
        Price, doc("Dollars per 1M input tokens: cost in the trace, report, budget and estimate.")
    ] = 0.0
    price_out: Annotated[Price, doc("Dollars per 1M output tokens.")] = 0.0
    concurrency: Annotated[Count, doc("Requests in flight at once to this endpoint.")] = 64
    rpm: Annotated[
        Rate | None, doc("Requests per minute allowed; unset: learned from 429s and rate-limit headers.")
    ] = None
    tpm: Annotated[
        Rate | None, doc("Tokens per minute allowed; unset: learned from 429s and rate-limit headers.")
    ] = None
    timeout_s: Annotated[Seconds, doc("Wall-clock deadline of one attempt, in seconds.")] = 120.0
    max_attempts: Annotated[
        Attempts,
        doc(
            "Attempts per request on 5xx, connection resets and timeouts (a 429 waits in admission instead)."
        ),
    ] = 6
    max_wait_s: Annotated[
        Seconds, doc("Ceiling on any pause a server asks for (Retry-After, rate-limit resets), in seconds.")
    ] = 600.0
    headers: Annotated[dict[HeaderName, HeaderValue], doc("Extra HTTP headers sent with every request.")] = {}
    mode: Annotated[
        Literal["online", "batch"],
        doc(
            "`online`: one HTTP call per request; `batch`: the provider's Batch API (half price, within 24 "
            "h)."
        ),
    ] = "online"
    batch: Annotated[
        BatchConfig, doc('How a `mode = "batch"` endpoint groups requests into provider batches.')
    ] = msgspec.field(default_factory=BatchConfig)
    price_cached_in: Annotated[
        Price | None, doc("Dollars per 1M cached input tokens (cache reads); unset: price_in.")
    ] = None
    price_cache_write: Annotated[
        Price | None, doc("Dollars per 1M input tokens written to Anthropic's prompt cache; unset: price_in.")
    ] = None
    accepts: Annotated[
        AcceptsConfig | None,
        doc(
            "Overrides of the parameters the model takes, e.g. `{ temperature = false }`; "
            "unset: the built-in table."
        ),
    ] = None
    reasoning: Annotated[
        ReasoningConfig | None,
        doc(
            'Reasoning controls, e.g. `{ effort = "high" }` or '
            "`{ budget_tokens = 4096, include_thoughts = true }`."
        ),
    ] = None
    name: Annotated[str, doc("Set from the table key (`[endpoints.NAME]`); leave it out.")] = ""

    def __post_init__(self) -> None:
        check_endpoint(self.provider, self.model, self.accepts, self.reasoning)
        self._check_pool()
        if self.mode != "batch":
            return
        items, size = BATCH_LIMITS[self.provider]
        b = self.batch
        for field, value, limit in (("max_items", b.max_items, items), ("max_bytes", b.max_bytes, size)):
            if value > limit:
                raise ValueError(f"batch.{field} = {value} is above {self.provider}'s limit {limit}")

    def _check_pool(self) -> None:
        if self.keys and self.api_key_env:
            raise ValueError("set either api_key_env (one key) or keys (a pool), not both")
        envs = [k.env for k in self.keys]
        if twice := sorted({e for e in envs if envs.count(e) > 1}):
            raise ValueError(f"keys: {twice[0]} is listed twice")
        used = {k.group for k in self.keys}
        if stray := sorted(set(self.groups) - used):
            raise ValueError(f"groups.{stray[0]}: no key of `keys` is in this group")

    @property
    def pooled(self) -> bool:
        """The endpoint has a key pool (``keys``), not one ``api_key_env``."""
        return bool(self.keys)

    def key_envs(self) -> list[str]:
        """The variables the endpoint reads its keys from (none for a keyless endpoint)."""
        return [k.env for k in self.keys] if self.keys else [self.api_key_env] if self.api_key_env else []

    def key_value(self, env: str) -> str:
        """The value of key variable ``env`` (``ConfigError``, exit 2, when it is not set)."""
        key = os.environ.get(env)
        if not key:
            raise ConfigError(f"endpoint {self.name!r}: environment variable {env} (keys) is not set")
        return key

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
    seed: Annotated[
        Seed, doc("Seed of the job's random choices and of every request's `seed`, so reruns ask the same.")
    ] = 0
    max_in_flight: Annotated[
        Count, doc("Problems in flight at once; bounds memory however large the dataset.")
    ] = 512
    shard_records: Annotated[PosInt, doc("Records per shard file before the next one is started.")] = 50_000
    breaker_window: Annotated[Count, doc("Recent problems the error-rate breaker looks at.")] = 200
    breaker_rate: Annotated[Share, doc("Abort (exit 3) when this share of the recent problems failed.")] = 0.5
    max_cost_usd: Annotated[
        Annotated[float, Meta(gt=0, le=1e9)] | None,
        doc(
            "Hard cap in dollars over the run directory's life; at the cap no new problem starts and the "
            "run exits 3."
        ),
    ] = None
    compress: Annotated[
        Literal["none", "zstd"],
        doc("`zstd`: sealed record and trace shards are written as `*.jsonl.zst` (~10x less disk)."),
    ] = "none"


class DatasetSection(Struct, kw_only=True):
    name: Annotated[
        str,
        doc(
            "`gsm8k`, `svamp`, `strategyqa`, `logiqa`, `builtin` (shipped in the package), `jsonl` (your "
            "file) or a hub name."
        ),
    ] = "builtin"
    path: Annotated[
        str | None,
        doc(
            "File or folder to read; default: `$FAIR_DATA_DIR`, else `../shared/datasets` beside the "
            "checkout."
        ),
    ] = None
    split: Annotated[
        str,
        doc(
            "Split the student's mistakes are collected on (the paper's: `train`; `fair eval` scores `test`)."
        ),
    ] = "train"
    limit: Annotated[NonNegInt | None, doc("Use at most this many problems.")] = None
    offset: Annotated[NonNegInt, doc("Skip this many problems first.")] = 0
    task: Annotated[
        Literal["numeric", "yesno", "choice"] | None,
        doc("Answer type of a `jsonl` dataset: a number, yes/no, or one of the options."),
    ] = None
    fields: Annotated[
        dict[str, str],
        doc("For `jsonl`: our field (id, question, answer, context, options) -> the key in your file."),
    ] = {}


class StudentSection(Struct, kw_only=True):
    endpoint: Annotated[str, doc("The endpoint (a key of `[endpoints]`) that serves the student.")]
    attempts: Annotated[
        Attempts, doc("Student attempts per problem; every wrong one is a mistake the teachers explain.")
    ] = 1
    temperature: Annotated[Temperature, doc("Sampling temperature of the student.")] = 0.0
    top_p: Annotated[
        Share | None,
        doc(
            "Nucleus sampling of the student (the paper: 0.9 at temperature 0.3); unset: the server's "
            "default."
        ),
    ] = None
    max_tokens: Annotated[Tokens, doc("Most tokens of a student answer.")] = 512
    # round 2 (engine.fair.student_server): `fair run` serves this LoRA adapter itself, at the student
    # endpoint's loopback address and under its model name, and stops the server at the end
    adapter: Annotated[
        Name | None,
        doc(
            "Round 2: a LoRA adapter folder that `fair run` serves itself at the student endpoint's "
            "loopback address."
        ),
    ] = None
    model: Annotated[
        Name | None,
        doc("Round 2: the base model under the adapter (default: the embedded SmolLM2-135M-Instruct)."),
    ] = None
    server: Annotated[
        Literal["auto", "cpu", "vllm"],
        doc("Round 2: `vllm` (`vllm serve`), `cpu` (`fair serve-student`), or `auto` (vLLM when installed)."),
    ] = "auto"


class TeachersSection(Struct, kw_only=True):
    endpoints: Annotated[
        list[str],
        doc(
            "The committee: two or more keys of `[endpoints]`; each writes rationales and reviews the "
            "others'."
        ),
    ]
    temperature: Annotated[Temperature, doc("Sampling temperature of the teachers.")] = 0.0
    max_tokens: Annotated[Tokens, doc("Most tokens of a rationale or a mistake explanation.")] = 1024
    review_max_tokens: Annotated[Tokens, doc("Most tokens of a peer review.")] = 512


class ReviewSection(Struct, kw_only=True):
    gold_check: Annotated[
        Literal["reject", "review-anyway", "record-only", "off"],
        doc(
            "A rationale whose final answer is not the gold: `reject` unreviewed, `review-anyway` (then "
            "reject), `record-only`, or `off`."
        ),
    ] = "reject"
    # accept iff aggregate(valid scores) > threshold: below MIN_SCORE everything passes, at
    # MAX_SCORE nothing can
    threshold: Annotated[
        float,
        Meta(ge=MIN_SCORE, lt=MAX_SCORE),
        doc("Accept a rationale when the aggregate of its valid scores (1-5) is above this (the paper: 3)."),
    ] = 3.0
    min_valid: Annotated[
        PosInt, doc("Valid review scores a rationale needs to be judged (at most teachers - 1).")
    ] = 1
    # calibrated: each reviewer's scores standardised against its own scores in the run first
    aggregation: Annotated[
        Literal["mean", "median", "min", "calibrated"],
        doc(
            "How scores combine: `mean` (the paper's), `median`, `min`, or `calibrated` (each reviewer's "
            "scores standardised first)."
        ),
    ] = "mean"
    early_stop: Annotated[bool, doc("Stop asking reviewers once the verdict cannot change.")] = True
    review_feedback: Annotated[
        bool, doc("Also peer-review the mistake explanations; a rejected one gives no mistake sample.")
    ] = False


class SamplesSection(Struct, kw_only=True):
    policy: Annotated[
        Literal["paper", "all"],
        doc(
            "`paper`: no samples without an accepted rationale, else one rationale and one explanation per "
            "mistake; `all`: every accepted rationale and every explanation."
        ),
    ] = "paper"
    answer_line: Annotated[
        bool, doc('Append "The answer is X." to accepted rationales that state no answer.')
    ] = True
    reasoning: Annotated[
        Literal["drop", "think"],
        doc(
            "A teacher's reasoning trace in training targets: `drop` (the answer only) or `think` "
            "(a `<think>...</think>` block before it)."
        ),
    ] = "drop"


class RunConfig(Struct, kw_only=True):
    run: Annotated[RunSection, doc("Seed, memory bound, error-rate breaker and cost cap of the job.")] = (
        msgspec.field(default_factory=RunSection)
    )
    dataset: Annotated[DatasetSection, doc("Where the problems come from.")] = msgspec.field(
        default_factory=DatasetSection
    )
    endpoints: Annotated[
        dict[str, EndpointConfig],
        doc("Every model the job talks to, one table per endpoint: `[endpoints.NAME]`."),
    ]
    student: Annotated[StudentSection, doc("The student whose mistakes are collected.")]
    teachers: Annotated[TeachersSection, doc("The committee of teachers.")]
    review: Annotated[ReviewSection, doc("Gold check, peer review and the acceptance threshold.")] = (
        msgspec.field(default_factory=ReviewSection)
    )
    samples: Annotated[SamplesSection, doc("Which training samples are written.")] = msgspec.field(
        default_factory=SamplesSection
    )
    prompts: Annotated[
        str, doc("Prompt set: `v1` (ours, with answer lines) or `paper` (the FAIR paper's).")
    ] = "v1"

    def __post_init__(self) -> None:
        for name, ep in self.endpoints.items():
            ep.name = name
        validate(self)


def validate(cfg: RunConfig) -> None:
    """The rules that span fields (single values are range-checked by their types). ValueError
    naming the field; msgspec turns it into a ValidationError, ``convert_config`` names the file."""
    known = set(cfg.endpoints)
    for name, ep in cfg.endpoints.items():  # a table that would be silently ignored
        if ep.mode != "batch" and ep.batch != BatchConfig():
            raise ValueError(f'endpoints.{name}: a `batch` table applies only with mode = "batch"')
    if cfg.student.endpoint not in known:
        raise ValueError(f"student.endpoint {cfg.student.endpoint!r} is not in [endpoints]")
    if cfg.student.adapter is not None:  # round 2: the run serves the student itself
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
    if cfg.prompts not in (known_prompts := prompt_versions()):
        raise ValueError(f"prompts: unknown version {cfg.prompts!r} (have {', '.join(known_prompts)})")


def prompt_versions(root: Path = PROMPTS_DIR) -> list[str]:
    """Every prompt version shipped (folders of ``engine/fair/prompts``)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def endpoint_address(cfg: RunConfig) -> tuple[str, int]:
    """The student endpoint's ``(host, port)``; ValueError (naming the field) unless it is loopback
    with a port and /v1 (round 2: ``engine.fair.student_server`` serves the adapter there)."""
    ep = cfg.endpoints[cfg.student.endpoint]
    url = urlsplit(ep.base_url)
    where = f"endpoints.{cfg.student.endpoint}.base_url"
    if url.hostname not in LOOPBACK or url.port is None:
        raise ValueError(
            f"{where}: with student.adapter the run serves the student itself, so it must be a loopback "
            f"URL with a port (http://127.0.0.1:8001/v1), not {ep.base_url!r}"
        )
    if not url.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"{where}: the served student answers under /v1, not {url.path or '/'!r}")
    if "/" in ep.model or "=" in ep.model:
        raise ValueError(
            f"endpoints.{cfg.student.endpoint}.model: {ep.model!r} names the served adapter: no '/' or '='"
        )
    return url.hostname, url.port


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


def _readable(exc: Exception) -> str:
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


def _drop_none(value: Any) -> Any:
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
