"""The simulator's shared state and content path, below every wire: counters, per-model live state
(profile, hidden limits, prompt caches: one per organisation when the profile has ``[keys]``), the
keys (``keys.KeyRing``) and ``SimCore``, which turns an accepted chat body (OpenAI shape) into a
completion payload. The wires (``openai_chat``, ``anthropic``, ``gemini``, the
``batch_*`` modules) read and answer through it; ``server.SimServer`` is a ``SimCore`` with an
aiohttp app. Content is deterministic in (profile seed, request seed, model, messages, choice
index); with no seed it is deterministic at temperature 0 or with no temperature sent, random
otherwise. Faults and latency come from one server-wide RNG seeded from the profile.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict, deque
from pathlib import Path

import orjson

from fairdistill.engine.config import DatasetSection
from fairdistill.engine.errors import ConfigError
from fairdistill.engine.fair.datasets import load_problems as load_dataset
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.sim.content import Reasoning, rng_for
from fairdistill.engine.sim.keys import KeyRing, KeyState
from fairdistill.engine.sim.limits import Bucket, Quota, admit
from fairdistill.engine.sim.profiles import ModelProfile, SimProfile, load_profile
from fairdistill.engine.sim.replay import ReplayData
from fairdistill.engine.sim.strict import Refusal, Think, check_openai
from fairdistill.engine.sim.usage import PromptCache, message_tokens, openai_view, thoughts, usage
from fairdistill.engine.wire import RequestInvalid, parse_chat_request

FAULTS = ("5xx", "hang", "reset", "malformed", "truncated", "empty", "length")


def load_problems(dataset: str) -> list[Problem]:
    """Problems for reasoning content: a dataset name as in ``[dataset]``, optionally ``NAME:SPLIT``
    (``gsm8k``, ``svamp:train``, ``builtin``...). Reasoning models answer every split of a dataset
    a client may ask about, so the default split here is ``all`` where the dataset has one."""
    name, _, split = dataset.partition(":")
    if split:
        return load_dataset(DatasetSection(name=name, split=split))
    try:
        return load_dataset(DatasetSection(name=name, split="all"))
    except ConfigError:
        return load_dataset(DatasetSection(name=name))


class SimStats(Counter):
    """Counters, readable as items or attributes (``stats.http_429``), plus the same per model in
    ``by_model``: ``requests``; ``ok`` (HTTP 200 sent, the faulty 200s below included);
    ``malformed``, ``truncated``, ``empty``, ``length`` (faulty 200s); ``http_429``; ``http_5xx``;
    ``http_4xx``; ``http_401`` (unknown or revoked keys); ``hangs`` and ``hangs_cancelled``;
    ``resets``. Missing counters read as 0. With ``[keys]``: ``by_key`` (by label: ``requests``
    carrying it on any wire, ``ok``, ``http_429``, ``http_401``, ``prompt_tokens`` and
    ``cached_tokens`` billed) and ``by_group`` (by organisation: ``requests``, ``ok``, ``http_429``)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_model: defaultdict[str, Counter] = defaultdict(Counter)
        self.by_key: defaultdict[str, Counter] = defaultdict(Counter)
        self.by_group: defaultdict[str, Counter] = defaultdict(Counter)

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def as_dict(self) -> dict:
        return {
            **self,
            "by_model": {k: dict(v) for k, v in self.by_model.items()},
            "by_key": {k: dict(v) for k, v in self.by_key.items()},
            "by_group": {k: dict(v) for k, v in self.by_group.items()},
        }

    def reset(self) -> None:
        self.clear()
        self.by_model.clear()
        self.by_key.clear()
        self.by_group.clear()


class ModelState:
    """Per-model live state: profile, hidden limits (``quota``), prompt caches, counters."""

    __slots__ = ("cache", "caches", "faulty", "limited", "name", "profile", "quota", "stats")

    def __init__(self, name: str, profile: ModelProfile, stats: Counter):
        self.name = name
        self.profile = profile
        self.stats = stats
        self.cache = PromptCache(profile.cache_min_tokens) if profile.prompt_cache else None
        self.caches: dict[str, PromptCache] = {}  # with [keys]: one per organisation
        self.quota = Quota(name, profile.rpm, profile.tpm, profile, profile.limit_headers)
        self.limited = self.quota.limited
        self.faulty = profile.faults.any()

    @property
    def requests(self) -> Bucket | None:
        return self.quota.requests

    @property
    def tokens(self) -> Bucket | None:
        return self.quota.tokens

    def cache_for(self, org: str | None) -> PromptCache | None:
        """The prompt cache a request of organisation ``org`` reads (None: this model caches
        nothing). Providers keep caches per organisation: one org never reads another's."""
        if self.cache is None or org is None:
            return self.cache
        if org not in self.caches:
            self.caches[org] = PromptCache(self.profile.cache_min_tokens)
        return self.caches[org]

    def reset(self) -> None:
        """Limits full again; the per-organisation caches emptied (the one shared cache of a
        simulator without keys is kept, as it always was)."""
        self.quota.reset()
        self.caches.clear()

    def limit_headers(self, now: float) -> dict[str, str]:
        return self.quota.headers(now)


class SimCore:
    """One simulated provider's state and content, without HTTP (``SimServer`` adds that)."""

    def __init__(
        self,
        profile: SimProfile | str | Path = "default",
        problems: list[Problem] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.profile = profile if isinstance(profile, SimProfile) else load_profile(profile)
        self.host = host
        self.port = port
        self.stats = SimStats()
        self.started_at = time.monotonic()
        self.rng = random.Random(self.profile.seed)
        s = self.stats
        self.keys = KeyRing(self.profile, s, s.by_key, s.by_group, lambda: time.monotonic() - self.started_at)
        self.models = {
            name: ModelState(name, mp, self.stats.by_model[name]) for name, mp in self.profile.models.items()
        }
        self.default = self.models.get(self.profile.default_model or "")
        self.serial = 0
        self.in_flight = 0  # requests being handled now (hangs included)
        self.latencies_ms: deque[float] = deque(maxlen=200_000)  # server-side time of recent 200 replies
        if problems is None and self.profile.dataset:
            problems = load_problems(self.profile.dataset)
        self.reasoning = Reasoning(problems)
        self.replay: ReplayData | None = None
        if any(mp.content == "replay" for mp in self.profile.models.values()):
            self.replay = ReplayData.load(self.profile.replay_dir)
            for p in self.replay.problems(dataset=None):
                self.reasoning.add(p)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def model(self, name: object) -> ModelState | None:
        """The model that answers ``name`` (the profile's default for an unknown one), or None."""
        found = self.models.get(name) if isinstance(name, str) else None
        return found or self.default

    def profile_for(self, name: object) -> ModelProfile:
        """The profile that answers model ``name`` (a default one for a model it will 404)."""
        model = self.model(name)
        return model.profile if model is not None else ModelProfile()

    def latency_s(self, p: ModelProfile) -> float:
        """A latency draw of profile ``p``: log-normal around ``latency_ms``, capped."""
        if p.latency_ms <= 0:
            return 0.0
        ms = p.latency_ms
        if p.latency_sigma > 0:
            ms = ms * math.exp(p.latency_sigma * self.rng.gauss(0.0, 1.0))
        return min(ms, p.latency_max_ms) / 1000.0

    def default_latency_s(self) -> float:
        """The latency of the default model (the online Anthropic and Gemini wires wait this)."""
        return self.latency_s(self.default.profile) if self.default is not None else 0.0

    def draw_fault(self, model: ModelState) -> str | None:
        """The fault this request meets: a burst in progress, else one drawn from the RNG."""
        f = model.profile.faults
        if f.bursts:
            t = time.monotonic() - self.started_at
            for b in f.bursts:
                if t >= b.offset_s and (t - b.offset_s) % b.every_s < b.duration_s:
                    return b.kind
        u = self.rng.random()
        for kind, p in zip(
            FAULTS,
            (f.p_5xx, f.p_hang, f.p_reset, f.p_malformed, f.p_truncated, f.p_empty, f.p_length),
            strict=True,
        ):
            if u < p:
                return kind
            u -= p
        return None

    def admit_key(self, key: KeyState | None, declared: float) -> tuple[Quota, str, float] | None:
        """The hidden limits of ``key`` and of its organisation (the Anthropic and Gemini online
        wires; OpenAI's checks the model's after them): the one that refuses, counted, or None."""
        quotas = self.keys.quotas(key)
        refused = admit(quotas, declared, time.monotonic()) if quotas else None
        if refused is not None:
            self.stats["http_429"] += 1
            self.keys.tally(key, "http_429")
        return refused

    def answer(self, body: dict, wire: str = "openai", org: str | None = None) -> tuple[int, dict]:
        """One chat body (OpenAI shape) through the content path, without hidden limits or faults:
        (status, payload), reading and writing organisation ``org``'s prompt cache. An OpenAI
        body is checked here (``strict.check_openai``); an Anthropic or Gemini one was checked
        when it was translated, its thinking carried as ``_sim_think``."""
        if "_sim_invalid" in body:  # a request the simulator refused when it read it
            return 400, {"error": {"message": body["_sim_invalid"], "type": "invalid_request_error"}}
        try:
            req = parse_chat_request(body)
        except RequestInvalid as exc:
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "param": exc.param}}
        model = self.model(req.model or "")
        if model is None:
            message = f"The model `{req.model}` does not exist."
            return 404, {"error": {"message": message, "type": "invalid_request_error"}}
        try:
            think = check_openai(body, model.profile) if wire == "openai" else Think(*body["_sim_think"])
        except Refusal as exc:
            kind = "invalid_request_error"
            return 400, {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}}
        payload = self.completion(model, req.model, body, req.n or 1, req.limit, None, think, org)
        return 200, (openai_view(payload, model.profile) if wire == "openai" else payload)

    def completion(
        self,
        model: ModelState,
        name: str | None,
        body: dict,
        n: int,
        limit: int | None,
        fault: str | None = None,
        think: Think = Think(),  # noqa: B008 (frozen)
        org: str | None = None,
    ) -> dict:
        """The chat completion payload of one accepted request (OpenAI's shape, with the reasoning
        text on each message as ``reasoning_content``; ``usage.openai_view`` shapes it per wire),
        its cached tokens those organisation ``org`` sent before."""
        messages = body["messages"]
        prompt = message_tokens(messages)
        cached = written = 0
        cache = model.cache_for(org)
        if cache is not None and body.get("_sim_cache", True):  # False: Anthropic, no cache_control
            cached, written = cache.visit(messages)
        choices, completion, reasoning = self._choices(model, body, messages, n, limit, fault, think)
        self.serial += 1
        return {
            "id": f"chatcmpl-sim{self.serial}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name or model.name,
            "choices": choices,
            "usage": usage(prompt, completion, reasoning, cached, written),
            "system_fingerprint": "fp_sim",
        }

    def _choices(
        self,
        model: ModelState,
        body: dict,
        messages: list,
        n: int,
        max_tokens: int | None,
        fault: str | None,
        think: Think,
    ) -> tuple[list[dict], int, int]:
        """(choices, completion tokens, of which reasoning). A token limit covers the thinking
        too, as on every provider: what thinking leaves is the answer's."""
        if fault == "empty":
            return [], 0, 0
        texts = self._texts(model, body, messages, n)
        choices = []
        completion = reasoning = 0
        key = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
        for i, text in enumerate(texts):
            finish = "stop"
            spent = min(think.tokens, max_tokens) if max_tokens is not None else think.tokens
            left = None if max_tokens is None else max_tokens - spent
            tokens = max(1, (len(text) + 3) // 4)
            if fault == "length":
                text, tokens, finish = text[: len(text) // 2], max(1, tokens // 2), "length"
            if left is not None and tokens > left:
                text, tokens, finish = text[: left * 4], left, "length"
            completion += tokens + spent
            reasoning += spent
            message: dict = {"role": "assistant", "content": text}
            if spent and think.show:
                message["reasoning_content"] = thoughts(key + b"%d" % i, spent)
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
        return choices, completion, reasoning

    def _texts(self, model: ModelState, body: dict, messages: list, n: int) -> list[str]:
        p = model.profile
        if p.content == "echo":
            last = messages[-1].get("content") if isinstance(messages[-1], dict) else ""
            text = "echo: " + (last if isinstance(last, str) else str(last))[: p.echo_chars]
            return [text] * n
        seed = body.get("seed")
        if seed is None:  # no temperature (a wire or model that takes none): reproducible too
            temperature = body.get("temperature") or 0
            seed = "t0" if temperature == 0 else f"r{self.rng.getrandbits(64)}"
        key = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
        template = self.reasoning.prompts.identify(messages)
        out = []
        for i in range(n):
            rng = rng_for(self.profile.seed, seed, model.name, key, i)
            if p.content == "replay" and self.replay is not None:
                out.append(self.replay.reply(p, model.name, template, messages, rng, self.reasoning))
            else:
                out.append(self.reasoning.reply(p, messages, rng))
        return out
