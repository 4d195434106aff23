"""What a simulated reply bills beyond its text: thinking and cached prompt tokens.

A reasoning model thinks before it answers: ``thoughts`` is that text (deterministic in the
request, and never inside the answer), billed as output tokens. ``PromptCache`` is a provider's
prompt cache: a request whose leading messages a model has seen before bills them as cached
input. The simulator's internal payload is OpenAI's chat completion, whose usage already names
both (``completion_tokens_details.reasoning_tokens`` inside ``completion_tokens``,
``prompt_tokens_details.cached_tokens`` / ``cache_write_tokens`` inside ``prompt_tokens``); the
reasoning text rides on each choice's message as ``reasoning_content``. ``openai_view`` shapes
that payload for the OpenAI wire of one model profile.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import orjson

from fairdistill.engine.sim.profiles import ModelProfile

_STEPS = (
    "Let me restate what is asked.",
    "I should check which quantities are given.",
    "Work through it one step at a time.",
    "Check the arithmetic again before answering.",
    "Consider whether the question hides a trap.",
    "The answer must fit the format asked for.",
)
MAX_PREFIXES = 100_000


def thoughts(key: bytes, tokens: int) -> str:
    """About ``tokens`` tokens (4 characters each) of thinking, deterministic in ``key``."""
    if tokens <= 0:
        return ""
    rng = random.Random(hashlib.blake2b(key, digest_size=8).digest())
    out: list[str] = []
    size = 0
    while size < tokens * 4:
        step = rng.choice(_STEPS)
        out.append(step)
        size += len(step) + 1
    return " ".join(out)[: tokens * 4]


def message_tokens(messages: list) -> int:
    """The simulator's token count of a prompt (4 characters a token, plus 3 per message)."""
    chars = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
    return chars // 4 + 3 * len(messages) + 3


class PromptCache:
    """The message prefixes one model has seen: ``visit(messages)`` -> (cached, written) tokens.

    Every prefix but the whole prompt is a cache entry (the last message is the new part); the
    longest one seen before is read from the cache, the longest new one is written to it."""

    def __init__(self, min_tokens: int = 0):
        self.min_tokens = min_tokens
        self.seen: set[bytes] = set()

    def visit(self, messages: list) -> tuple[int, int]:
        read = written = 0
        digest = hashlib.blake2b(digest_size=16)
        for j in range(1, len(messages)):
            digest.update(orjson.dumps(messages[j - 1], option=orjson.OPT_SORT_KEYS))
            key = digest.copy().digest()
            tokens = message_tokens(messages[:j]) - 3
            if tokens < self.min_tokens:
                continue
            if key in self.seen:
                read = tokens
            else:
                written = tokens
                if len(self.seen) >= MAX_PREFIXES:
                    self.seen.clear()
                self.seen.add(key)
        return read, (written if written > read else 0)


def usage(prompt: int, completion: int, reasoning: int, cached: int, written: int) -> dict[str, Any]:
    """OpenAI's usage object; ``completion`` includes the ``reasoning`` tokens."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def openai_view(payload: dict[str, Any], p: ModelProfile) -> dict[str, Any]:
    """The payload as this model's OpenAI wire sends it: the reasoning text under the profile's
    ``reasoning_field`` (vLLM-like servers) or not at all (OpenAI's own API); the cache-write
    count only where a cache was written (OpenAI reports none)."""
    for c in payload["choices"]:
        text = c["message"].pop("reasoning_content", None)
        if p.reasoning_field and text:
            c["message"][p.reasoning_field] = text
    payload["usage"]["prompt_tokens_details"].pop("cache_write_tokens", None)
    return payload
