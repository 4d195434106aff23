"""Gemini's online wire on the simulator (``POST /v1beta/models/M:generateContent``; the route is
shared with batch mode, see ``batch_gemini``), Google's key check and error shapes, and the
translation both Gemini wires use: a GenerateContentRequest -> the OpenAI chat body the content
path reads (``from_gemini``), a completion payload -> a GenerateContentResponse (``to_gemini``).
Credentials: ``x-goog-api-key``. Shapes follow https://ai.google.dev/api/generate-content.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from aiohttp import web

from fairdistill.engine.sim.core import SimCore
from fairdistill.engine.sim.keys import KeyRing, KeyState, org_of
from fairdistill.engine.sim.limits import Quota
from fairdistill.engine.sim.profiles import ModelProfile
from fairdistill.engine.sim.replies import gemini_error, json_reply
from fairdistill.engine.sim.strict import Refusal, check_gemini
from fairdistill.engine.sim.strict import get as gemini_get
from fairdistill.engine.sim.usage import message_tokens

_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}
_INVALID_KEY = "API key not valid. Please pass a valid API key."
_KEY_INFO = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com"}  # fmt: skip
_CONFIG = (("temperature", "temperature"), ("maxOutputTokens", "max_tokens"), ("topP", "top_p"),
           ("candidateCount", "n"), ("seed", "seed"), ("stopSequences", "stop"))  # fmt: skip


def key_refused(api_key: str | None, request: web.Request) -> web.Response | None:
    """Google's answers: no key is 403 PERMISSION_DENIED; a wrong one is a 400 whose details
    carry the reason ``API_KEY_INVALID`` (None: let it in)."""
    given = request.headers.get("x-goog-api-key") or request.query.get("key")
    if api_key is None or given == api_key:
        return None
    if given is None:
        return gemini_error(403, "Method doesn't allow unregistered callers.", "PERMISSION_DENIED")
    return gemini_error(400, _INVALID_KEY, "INVALID_ARGUMENT", [_KEY_INFO])


def caller(keys: KeyRing, api_key: str | None, request: web.Request) -> web.Response | KeyState | None:
    """Who sends ``request`` on a Gemini route: its key (``x-goog-api-key`` or ``?key=``; None:
    the simulator has no ``[keys]``), or Google's answer: 403 PERMISSION_DENIED without a key,
    400 ``API_KEY_INVALID`` for an unknown one ("not valid") or a revoked one ("expired")."""
    if not keys.enabled:
        return key_refused(api_key, request)
    found = keys.authenticate(request.headers.get("x-goog-api-key") or request.query.get("key"))
    if not isinstance(found, str):
        return found
    if found == "missing":
        return gemini_error(403, "Method doesn't allow unregistered callers.", "PERMISSION_DENIED")
    message = "API key expired. Please renew the API key." if found == "revoked" else _INVALID_KEY
    return gemini_error(400, message, "INVALID_ARGUMENT", [_KEY_INFO])


def too_many(quota: Quota, wait: float) -> web.Response:
    """Google's 429 RESOURCE_EXHAUSTED: a RetryInfo where the limit shows itself, else only
    ``Retry-After: 1``."""
    details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{math.ceil(wait)}s"}]
    reply = gemini_error(429, f"Resource has been exhausted (e.g. check quota): {quota.name}.",
                         "RESOURCE_EXHAUSTED", details if quota.visible else None)  # fmt: skip
    reply.headers["Retry-After"] = str(max(1, math.ceil(wait))) if quota.visible else "1"
    return reply


def refusal(exc: Refusal) -> web.Response:
    """Google's 400 for a field it refuses: INVALID_ARGUMENT with a BadRequest field violation."""
    violation = {"field": exc.param or "", "description": str(exc)}
    details = [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]}]
    return gemini_error(400, str(exc), "INVALID_ARGUMENT", details)


def _text(content: dict) -> str:
    return "".join(p.get("text", "") for p in content["parts"] if isinstance(p, dict))


def from_gemini(req: dict, model: str, profile: ModelProfile | None = None) -> dict:
    """A Gemini GenerateContentRequest (checked by ``strict.check_gemini``) -> the OpenAI chat
    body the content path reads."""
    if not isinstance(req, dict) or not isinstance(req.get("contents"), list) or not req["contents"]:
        raise ValueError("contents: must be a non-empty list")
    think = check_gemini(req, profile or ModelProfile())
    messages = [
        {"role": "assistant" if c.get("role") == "model" else "user", "content": _text(c)}
        for c in req["contents"]
    ]
    system = gemini_get(req, "systemInstruction")
    if system:
        messages = [{"role": "system", "content": _text(system)}, *messages]
    body: dict[str, Any] = {"model": model, "messages": messages, "_sim_think": (think.tokens, think.show)}
    cfg = gemini_get(req, "generationConfig") or {}
    for theirs, ours in _CONFIG:
        if gemini_get(cfg, theirs) is not None:
            body[ours] = gemini_get(cfg, theirs)
    return body


def _parts(message: dict) -> list[dict]:
    thought = message.get("reasoning_content")
    head = [{"text": thought, "thought": True}] if thought else []
    return [*head, {"text": message["content"]}]


def to_gemini(payload: dict) -> dict:
    """An OpenAI chat completion payload -> a Gemini GenerateContentResponse: thoughts as parts
    marked ``thought`` (when asked for), billed in ``thoughtsTokenCount`` beside (not inside)
    ``candidatesTokenCount``; cached prompt tokens in ``cachedContentTokenCount``."""
    u = payload["usage"]
    reasoning = u.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
    cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    usage: dict[str, Any] = {
        "promptTokenCount": u["prompt_tokens"],
        "candidatesTokenCount": u["completion_tokens"] - reasoning,
        "totalTokenCount": u["total_tokens"],
    }
    if reasoning:
        usage["thoughtsTokenCount"] = reasoning
    if cached:
        usage["cachedContentTokenCount"] = cached
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": _parts(c["message"])},
                "finishReason": _FINISH.get(c["finish_reason"], "STOP"),
                "index": c["index"],
            }
            for c in payload["choices"]
        ],
        "usageMetadata": usage,
        "modelVersion": payload.get("model") or "",
        "responseId": payload["id"].replace("chatcmpl-", ""),
    }


async def generate_content(
    core: SimCore, request: web.Request, model: str, key: KeyState | None = None
) -> web.Response:
    """``POST /v1beta/models/M:generateContent`` (``key`` already checked): answered like a chat
    completion (the hidden limits of its key and organisation, none of the model's, no faults;
    the default model's latency)."""
    core.stats["requests"] += 1
    try:
        body = from_gemini(orjson.loads(await request.read()), model, core.profile_for(model))
    except Refusal as exc:
        core.stats["http_4xx"] += 1
        return refusal(exc)
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return gemini_error(400, f"Invalid JSON payload: {exc}", "INVALID_ARGUMENT")
    limit = body.get("max_tokens")
    declared = message_tokens(body["messages"]) + (limit or 0) * (body.get("n") or 1)
    if (refused := core.admit_key(key, declared)) is not None:
        return too_many(refused[0], refused[2])
    if (delay := core.default_latency_s()) > 0:
        await asyncio.sleep(delay)
    status, payload = core.answer(body, "gemini", org_of(key))
    if status != 200:
        return gemini_error(status, payload["error"]["message"], "INVALID_ARGUMENT")
    if not limit:  # reconcile: undeclared tokens count too
        for q in core.keys.quotas(key):
            q.settle(payload["usage"]["completion_tokens"])
    core.stats["ok"] += 1
    core.keys.tally(key, "ok")
    core.keys.billed(key, payload["usage"])
    return json_reply(to_gemini(payload))
