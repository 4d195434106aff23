"""What each provider's models accept: the one table the encoders read, and the 400s that name a
refused parameter.

``accepts_for(provider, model, override)`` is the ``Accepts`` row of the first pattern in
``TABLE[provider]`` that matches the model name, with the endpoint's ``accepts = {...}`` laid over
it. An encoder sends a parameter only where its row says so. The rows follow the official SDKs
and the providers' model pages as of 2026:

- OpenAI: ``max_completion_tokens`` (``max_tokens`` is deprecated and refused by reasoning
  models); reasoning models (o-series, gpt-5*) refuse a non-default temperature/top_p and take
  ``reasoning_effort``. OpenAI-compatible servers (vLLM, llama.cpp, the simulator) take everything.
- Anthropic: ``MessageCreateParams`` has no temperature/top_p/top_k (current Claude models answer
  400 "`temperature` is deprecated"), no ``n`` (the client fans out) and no ``seed``.
- Gemini: ``generationConfig`` takes them all (``candidateCount`` is n).

``refused_param(provider, body)`` reads a 400 body and names the parameter it refuses (as a
``Param``), or None when the 400 is about something else; the client then drops it for the
endpoint and sends again (``Accepts.without``). A pure module (msgspec and re only), so the config
loader may use ``check_endpoint`` at load time.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

TokenLimit = Literal["max_tokens", "max_completion_tokens"]
# what the client may drop: the sampling parameters, n, the token-limit field and the reasoning controls
Param = Literal[
    "temperature", "top_p", "n", "seed", "stop", "max_tokens", "max_completion_tokens", "reasoning"
]


class Accepts(msgspec.Struct, frozen=True, kw_only=True):
    """The request parameters one model takes (False: never sent)."""

    temperature: bool = True
    top_p: bool = True
    n: bool = True  # False: the client issues n separate calls
    seed: bool = True
    stop: bool = True
    token_limit: TokenLimit = "max_tokens"  # the wire name of the completion-token limit
    reasoning: bool = False  # takes reasoning controls (reasoning_effort / thinking / thinkingConfig)

    def without(self, param: str) -> Accepts | None:
        """This row with ``param`` dropped (a refused token-limit name switches to the other one);
        None when it changes nothing (already dropped: sending again would be refused again)."""
        if param in ("max_tokens", "max_completion_tokens"):
            if self.token_limit != param:
                return None
            other = "max_completion_tokens" if param == "max_tokens" else "max_tokens"
            return msgspec.structs.replace(self, token_limit=other)
        if not getattr(self, param, False):
            return None
        return msgspec.structs.replace(self, **{param: False})


_OPENAI_REASONING = Accepts(
    temperature=False, top_p=False, token_limit="max_completion_tokens", reasoning=True
)
_OPENAI = Accepts(token_limit="max_completion_tokens")
_OPENAI_COMPATIBLE = Accepts(token_limit="max_completion_tokens", reasoning=True)  # vLLM, llama.cpp...
_ANTHROPIC = Accepts(temperature=False, top_p=False, n=False, seed=False, reasoning=True)
_GEMINI = Accepts(reasoning=True)

# (provider) -> [(model name pattern, row)], first match wins; "" matches every model
TABLE: dict[str, list[tuple[str, Accepts]]] = {
    "openai": [
        (r"^gpt-5(\.\d+)?-chat", _OPENAI),  # the chat variants of gpt-5 are not reasoning models
        (r"^(o[1-9]|gpt-5)", _OPENAI_REASONING),
        (r"^(gpt-4|gpt-3\.5|chatgpt)", _OPENAI),
        (r"", _OPENAI_COMPATIBLE),
    ],
    "anthropic": [(r"", _ANTHROPIC)],
    "gemini": [(r"", _GEMINI)],
}

# what a provider's wire has no field for, whatever the model: asking for it is a config error
NEVER: dict[str, dict[str, str]] = {
    "anthropic": {"n": "the Messages API has no n (the engine fans out n calls)", "seed": "it has no seed"},
}


def accepts_for(provider: str, model: str, override: Any = None) -> Accepts:
    """The table's row for ``model``, with the non-None fields of ``override`` (the endpoint's
    ``accepts`` table, a Struct or a mapping) laid over it."""
    row = next((acc for pattern, acc in TABLE[provider] if re.search(pattern, model)), Accepts())
    if override is None:
        return row
    given = override if isinstance(override, dict) else msgspec.structs.asdict(override)
    return msgspec.structs.replace(row, **{k: v for k, v in given.items() if v is not None})


ANTHROPIC_MIN_BUDGET = 1024  # the Messages API's smallest thinking budget


def check_endpoint(provider: str, model: str, override: Any, reasoning: Any) -> None:
    """ValueError naming the field when an endpoint asks for what its provider never accepts."""
    given = (
        override
        if isinstance(override, dict)
        else {}
        if override is None
        else msgspec.structs.asdict(override)
    )
    for field, why in NEVER.get(provider, {}).items():
        if given.get(field):
            raise ValueError(f"accepts.{field} = true: {provider} never accepts it ({why})")
    if given.get("token_limit") is not None and provider != "openai":
        raise ValueError(f"accepts.token_limit: only the openai wire has a choice ({provider} has its own)")
    if reasoning is None:
        return
    if not accepts_for(provider, model, override).reasoning:
        raise ValueError(
            f"reasoning: model {model!r} takes no reasoning controls on the {provider} wire "
            "(a reasoning model, or accepts.reasoning = true for a server that takes them)"
        )
    budget = reasoning.budget_tokens
    if provider == "anthropic" and budget is not None and budget < ANTHROPIC_MIN_BUDGET:
        raise ValueError(
            f"reasoning.budget_tokens = {budget}: anthropic's smallest is {ANTHROPIC_MIN_BUDGET}"
        )
    if provider == "gemini" and budget is not None and reasoning.effort not in (None, "none"):
        raise ValueError(
            "reasoning: gemini takes effort (thinkingLevel) or budget_tokens (thinkingBudget), not both"
        )


# -- 400s that name a refused parameter -----------------------------------------------------------

# wire name -> Param, per provider (snake and camel case: Gemini's errors use either)
_WIRE: dict[str, dict[str, str]] = {
    "openai": {
        "temperature": "temperature",
        "top_p": "top_p",
        "n": "n",
        "seed": "seed",
        "stop": "stop",
        "max_tokens": "max_tokens",
        "max_completion_tokens": "max_completion_tokens",
        "reasoning_effort": "reasoning",
    },
    "anthropic": {
        "temperature": "temperature",
        "top_p": "top_p",
        "stop_sequences": "stop",
        "thinking": "reasoning",
    },
    "gemini": {
        "temperature": "temperature",
        "topP": "top_p",
        "top_p": "top_p",
        "candidateCount": "n",
        "candidate_count": "n",
        "seed": "seed",
        "stopSequences": "stop",
        "stop_sequences": "stop",
        "thinkingConfig": "reasoning",
        "thinking_config": "reasoning",
        "thinkingLevel": "reasoning",
        "thinking_level": "reasoning",
        "thinkingBudget": "reasoning",
        "thinking_budget": "reasoning",
        "includeThoughts": "reasoning",
        "include_thoughts": "reasoning",
    },
}
_REFUSAL = re.compile(
    r"unsupported|not supported|deprecated|unknown (name|field|parameter)|extra inputs|not permitted"
    r"|cannot find field|does not support|not allowed|unrecognized",
    re.IGNORECASE,
)
_CODES = frozenset({"unsupported_parameter", "unsupported_value"})


class _Detail(msgspec.Struct):
    message: str | None = None
    param: str | None = None
    code: str | int | None = None  # OpenAI "unsupported_parameter"; Gemini 400


class _Body(msgspec.Struct):
    error: _Detail | str | None = None


_body = msgspec.json.Decoder(_Body)


def refused_param(provider: str, body: bytes) -> str | None:
    """The parameter a 400 body says the model does not take (a ``Param``), or None."""
    try:
        err = _body.decode(body[:65536]).error
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    names = _WIRE.get(provider, {})
    if isinstance(err, _Detail) and err.param in names and (err.code in _CODES or _refused(err.message)):
        return names[err.param]
    message = err.message if isinstance(err, _Detail) else err
    if not message or not _refused(message):
        return None
    found = [(m.start(), names[m.group(1)]) for m in _NAMED[provider].finditer(message)] if names else []
    return min(found)[1] if found else None


def _refused(message: str | None) -> bool:
    return bool(message and _REFUSAL.search(message))


# a wire name as a whole word ("topK" in 'Unknown name "topK"', `temperature`, 'max_tokens')
_NAMED = {
    provider: re.compile(
        r"(?<![A-Za-z_])("
        + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
        + r")(?![A-Za-z_])"
    )
    for provider, names in _WIRE.items()
}
