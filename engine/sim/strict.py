"""What each simulated wire refuses, checked as its provider checks it.

A provider answers a parameter it does not know, or one the model refuses, with a 400 naming it;
a simulator that accepts anything proves nothing about the requests a client sends. The
parameter sets below are those of the official SDKs' request types (``openai`` 3.63
``CompletionCreateParams``, ``anthropic`` 2.17 ``MessageCreateParams``, ``google-genai`` 3.6
``GenerationConfig`` / ``ThinkingConfig`` with the REST API's camelCase names);
``tests/test_sdk_contract.py`` keeps them inside the SDKs' own. Per model profile
(``engine.sim.profiles.ModelProfile``): ``sampling = false`` refuses sampling parameters,
``refuses`` names more, ``accepts`` lets an OpenAI-compatible server take extras (vLLM's
``top_k``), ``thinking`` makes a reasoning model whose thinking each check sizes (``Think``).

Each ``check_*`` returns the ``Think`` of an accepted request or raises ``Refusal`` with the
provider's words; the routes put them into that provider's error body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fairdistill.engine.sim.profiles import ModelProfile

OPENAI_PARAMS = frozenset(
    [
        "messages",
        "model",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    ]
)
ANTHROPIC_PARAMS = frozenset(
    [
        "max_tokens",
        "messages",
        "model",
        "cache_control",
        "container",
        "diagnostics",
        "inference_geo",
        "metadata",
        "output_config",
        "service_tier",
        "speed",
        "stop_sequences",
        "stream",
        "system",
        "thinking",
        "tool_choice",
        "tools",
        "user_profile_id",
        "workspace_id",
    ]
)
# Sampling parameters Anthropic took before API version 2026-10-21 (the SDK 2.x default), which
# removed them; current models refuse them under older versions too ("deprecated for this model").
ANTHROPIC_SAMPLING = ("temperature", "top_p", "top_k")
ANTHROPIC_NO_SAMPLING_FROM = "2026-10-21"
GEMINI_REQUEST = frozenset(
    [
        "contents",
        "systemInstruction",
        "generationConfig",
        "safetySettings",
        "tools",
        "toolConfig",
        "cachedContent",
    ]
)
GEMINI_GENERATION = frozenset(
    [
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "enableEnhancedCivicAnswers",
        "speechConfig",
        "thinkingConfig",
        "mediaResolution",
    ]
)
GEMINI_THINKING = frozenset({"includeThoughts", "thinkingBudget", "thinkingLevel"})
# thinking spent at each effort, relative to the profile's medium ``thinking_tokens``
EFFORT = {"none": 0.0, "minimal": 0.25, "low": 0.5, "medium": 1.0, "high": 2.0, "xhigh": 3.0, "max": 4.0}
GEMINI_LEVELS = {"MINIMAL": "minimal", "LOW": "low", "MEDIUM": "medium", "HIGH": "high", "XHIGH": "xhigh"}


class Refusal(Exception):
    """A request the simulated provider refuses: its message, the parameter, OpenAI's ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Think:
    """What one accepted request makes a model think: tokens per choice, and whether the reply
    carries the thinking text (Gemini ``includeThoughts``, Anthropic ``display``)."""

    tokens: int = 0
    show: bool = True


def spend(p: ModelProfile, effort: str | None = "medium", budget: int | None = None) -> Think:
    """The thinking of a reasoning model at ``effort``, capped by ``budget`` (-1: the model's own)."""
    if not p.thinking:
        return Think()
    tokens = int(p.thinking_tokens * EFFORT.get(effort or "medium", 1.0))
    if budget is not None and budget >= 0:
        tokens = min(tokens, budget)
    return Think(tokens)


def snake(name: str) -> str:
    """``maxOutputTokens`` -> ``max_output_tokens`` (Google's JSON parser takes either spelling)."""
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def check_openai(body: dict[str, Any], p: ModelProfile) -> Think:
    """OpenAI chat completions: unknown keys, and what this model refuses."""
    for key in body:
        if key not in OPENAI_PARAMS and key not in p.accepts and not key.startswith("_sim"):
            raise Refusal(f"Unrecognized request argument supplied: {key}", key)
    for key in p.refuses:
        if key in body:
            hint = " Use 'max_completion_tokens' instead." if key == "max_tokens" else ""
            raise Refusal(
                f"Unsupported parameter: '{key}' is not supported with this model.{hint}",
                key,
                "unsupported_parameter",
            )
    if not p.sampling:
        for key in ("temperature", "top_p"):
            if body.get(key) not in (None, 1, 1.0):
                raise Refusal(
                    f"Unsupported value: '{key}' does not support {body[key]} with this model. "
                    "Only the default (1) value is supported.",
                    key,
                    "unsupported_value",
                )
    effort = body.get("reasoning_effort")
    if effort is not None and not p.thinking:
        raise Refusal(
            "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
            "reasoning_effort",
            "unsupported_parameter",
        )
    if effort is not None and effort not in EFFORT:
        raise Refusal(f"Invalid value: '{effort}'. Supported values are: {sorted(EFFORT)}.",
                      "reasoning_effort", "invalid_value")  # fmt: skip
    return spend(p, effort)


def check_anthropic(params: dict[str, Any], p: ModelProfile, version: str) -> Think:
    """Anthropic Messages: unknown keys (``n`` among them), sampling parameters by API version
    and model, and the ``thinking`` rules (budget >= 1024 and below ``max_tokens``)."""
    legacy = version < ANTHROPIC_NO_SAMPLING_FROM
    for key in params:
        if key in ANTHROPIC_PARAMS or key.startswith("_sim"):
            continue
        if key in ANTHROPIC_SAMPLING and legacy:
            if not p.sampling:
                raise Refusal(f"`{key}` is deprecated for this model.", key)
            continue
        raise Refusal(f"{key}: Extra inputs are not permitted", key)
    for key in p.refuses:
        if key in params:
            raise Refusal(f"`{key}` is not supported for this model.", key)
    thinking = params.get("thinking")
    if thinking is None:
        return Think()
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise Refusal("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'", "thinking")
    if thinking["type"] == "disabled":
        return Think()
    if not p.thinking:
        raise Refusal("thinking: this model does not support extended thinking", "thinking")
    if any(k in params for k in ANTHROPIC_SAMPLING if params.get(k) not in (None, 1, 1.0)):
        raise Refusal("temperature may only be set to 1 when thinking is enabled", "temperature")
    show = thinking.get("display") != "omitted"
    if thinking["type"] == "adaptive":
        effort = (params.get("output_config") or {}).get("effort")
        return Think(spend(p, effort).tokens, show)
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < 1024:
        raise Refusal("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
                      "thinking.budget_tokens")  # fmt: skip
    if budget >= params.get("max_tokens", 0):
        raise Refusal("`max_tokens` must be greater than `thinking.budget_tokens`", "max_tokens")
    return Think(spend(p, "medium", budget).tokens, show)


def _unknown(name: str, where: str) -> Refusal:
    return Refusal(f'Invalid JSON payload received. Unknown name "{name}" at \'{where}\': Cannot find field.',
                   f"{where}.{name}" if where else name)  # fmt: skip


def _known(obj: dict, names: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in names and not any(snake(n) == key for n in names):
            raise _unknown(key, where)


def get(obj: dict, name: str) -> Any:
    """``obj[name]`` under its camelCase or its snake_case spelling (None when absent)."""
    return obj.get(name, obj.get(snake(name)))


def check_gemini(req: dict[str, Any], p: ModelProfile) -> Think:
    """Gemini generateContent: unknown top-level, ``generationConfig`` and ``thinkingConfig``
    names (the REST API's camelCase, or snake_case), and the thinking a model takes."""
    _known({k: v for k, v in req.items() if not k.startswith("_sim")}, GEMINI_REQUEST, "")
    cfg = get(req, "generationConfig") or {}
    if not isinstance(cfg, dict):
        raise Refusal("Invalid value at 'generation_config': not an object", "generation_config")
    _known(cfg, GEMINI_GENERATION, "generation_config")
    for key in p.refuses:
        if get(cfg, key) is not None:
            raise Refusal(f"{key} is not supported by this model.", key)
    tc = get(cfg, "thinkingConfig")
    if tc is None:  # a thinking model thinks by default; its thoughts stay out of the reply
        return Think(spend(p, "medium", -1).tokens, show=False)
    if not isinstance(tc, dict):
        raise Refusal("Invalid value at 'generation_config.thinking_config'", "thinking_config")
    _known(tc, GEMINI_THINKING, "generation_config.thinking_config")
    budget, level = get(tc, "thinkingBudget"), get(tc, "thinkingLevel")
    if budget is not None and level is not None:
        raise Refusal("thinking_budget and thinking_level cannot both be set.", "thinking_config")
    if not p.thinking:
        if budget not in (None, 0) or level is not None or get(tc, "includeThoughts"):
            raise Refusal("Thinking is not supported for this model.", "thinking_config")
        return Think()
    if level is not None and level not in GEMINI_LEVELS:
        raise Refusal(f"Invalid value at 'generation_config.thinking_config.thinking_level' ({level})",
                      "thinking_level")  # fmt: skip
    if budget is not None and (not isinstance(budget, int) or budget < -1):
        raise Refusal(f"Invalid thinking budget {budget}", "thinking_budget")
    effort = GEMINI_LEVELS.get(level or "", "medium")
    return Think(spend(p, effort, budget).tokens, bool(get(tc, "includeThoughts")))
