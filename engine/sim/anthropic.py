"""Anthropic's online wire on the simulator (``POST /v1/messages``) and the translation both
Anthropic wires use: Messages params -> the OpenAI chat body the content path reads
(``from_anthropic``), a completion payload -> an Anthropic Message (``to_anthropic``).
Shapes follow https://docs.anthropic.com/en/api/messages.
"""

from __future__ import annotations

import asyncio
import math

import orjson
from aiohttp import web

from fairdistill.engine.sim.core import SimCore
from fairdistill.engine.sim.keys import org_of
from fairdistill.engine.sim.limits import Quota
from fairdistill.engine.sim.profiles import ModelProfile
from fairdistill.engine.sim.replies import anthropic_error, caller, json_reply
from fairdistill.engine.sim.strict import Refusal, check_anthropic
from fairdistill.engine.sim.usage import message_tokens

_STOP = {"stop": "end_turn", "length": "max_tokens"}


def _has_cache_control(params: dict) -> bool:
    """Anthropic caches a prompt only where the request asks: top-level or on any block."""
    return b'"cache_control"' in orjson.dumps(params)


def from_anthropic(params: dict, profile: ModelProfile, version: str) -> dict:
    """Anthropic Messages params (checked by ``strict.check_anthropic`` under the request's
    ``anthropic-version``) -> the OpenAI chat body the content path reads."""
    if not isinstance(params, dict):
        raise ValueError("params must be an object")
    if not isinstance(params.get("max_tokens"), int):
        raise ValueError("max_tokens: Field required")
    think = check_anthropic(params, profile, version)
    messages = list(params["messages"])
    system = params.get("system")
    if isinstance(system, list):
        system = "".join(p.get("text", "") for p in system if isinstance(p, dict))
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    body = {"model": params.get("model"), "messages": messages, "max_tokens": params["max_tokens"]}
    for k in ("temperature", "top_p"):
        if k in params:
            body[k] = params[k]
    if params.get("stop_sequences"):
        body["stop"] = params["stop_sequences"]
    body["_sim_think"] = (think.tokens, think.show)
    body["_sim_cache"] = _has_cache_control(params)
    return body


def read_params(core: SimCore, params: object, version: str) -> dict:
    """Anthropic params checked against the profile of the model they name (``Refusal``) and
    translated for the content path."""
    if not isinstance(params, dict):
        raise ValueError("params must be an object")
    return from_anthropic(params, core.profile_for(params.get("model")), version)


def to_anthropic(payload: dict, model: str) -> dict:
    """An OpenAI chat completion payload -> an Anthropic Message: a ``thinking`` block (its text
    empty under ``display: omitted``) before the text; ``output_tokens`` include the thinking;
    ``input_tokens`` are those neither read from nor written to the cache."""
    c = payload["choices"][0]
    u = payload["usage"]
    details = u.get("prompt_tokens_details", {})
    cached, written = details.get("cached_tokens", 0), details.get("cache_write_tokens", 0)
    content: list[dict] = []
    if u.get("completion_tokens_details", {}).get("reasoning_tokens", 0):
        thought = c["message"].get("reasoning_content") or ""
        content.append({"type": "thinking", "thinking": thought, "signature": "sim-" + payload["id"]})
    content.append({"type": "text", "text": c["message"]["content"]})
    return {
        "id": payload["id"].replace("chatcmpl", "msg"),
        "type": "message",
        "role": "assistant",
        "model": payload.get("model") or model,
        "content": content,
        "stop_reason": _STOP.get(c["finish_reason"], "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": u["prompt_tokens"] - cached - written,
            "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": written,
        },
    }


class AnthropicMessages:
    """``POST /v1/messages``: Anthropic's online call, answered like a chat completion (the hidden
    limits of its key and organisation, none of the model's, no faults; the default model's
    latency)."""

    def __init__(self, core: SimCore):
        self.core = core

    def mount(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)

    async def messages(self, request: web.Request) -> web.Response:
        core = self.core
        key = caller(core.keys, core.profile.api_key, request, anthropic=True)
        if isinstance(key, web.Response):
            return key
        core.stats["requests"] += 1
        version = request.headers.get("anthropic-version", "")
        try:
            body = read_params(core, orjson.loads(await request.read()), version)
        except Refusal as exc:
            core.stats["http_4xx"] += 1
            return anthropic_error(400, str(exc))
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
            return anthropic_error(400, f"invalid request: {exc}")
        if (
            refused := core.admit_key(key, message_tokens(body["messages"]) + body["max_tokens"])
        ) is not None:
            return too_many(*refused)
        if (delay := core.default_latency_s()) > 0:
            await asyncio.sleep(delay)
        status, payload = core.answer(body, "anthropic", org_of(key))
        if status != 200:
            return anthropic_error(status, payload["error"]["message"])
        core.stats["ok"] += 1
        core.keys.tally(key, "ok")
        core.keys.billed(key, payload["usage"])
        return json_reply(to_anthropic(payload, body.get("model") or ""))


def too_many(quota: Quota, kind: str, wait: float) -> web.Response:
    """Anthropic's 429 ``rate_limit_error``: ``retry-after`` in seconds where the limit shows
    itself, else 1."""
    message = f"This request would exceed the rate limit of {quota.name} on {kind} per minute."
    reply = anthropic_error(429, message, "rate_limit_error")
    reply.headers["retry-after"] = str(max(1, math.ceil(wait))) if quota.visible else "1"
    return reply
