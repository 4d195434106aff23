"""Wire protocols. One module per protocol, each a small transport-like object.

A provider only *translates*: it builds the URL, headers and body of one call from a
``ChatRequest`` and decodes a response body into a ``Completion``. It knows nothing about
retries, limits, caching or sessions (those live in ``engine.request.client`` and
``engine.request.admission``)::

    provider = make_provider(cfg)
    url, body = provider.url, provider.encode(request)
    headers = provider.headers(api_key)
    completion = provider.decode(raw_body)          # ReplyError when unusable
    limits = provider.limits(response_headers)      # rate-limit headers in OpenAI's x-ratelimit-*
    provider.refused(error_body)                     # a 400 naming a parameter the model refuses
    provider.drop("temperature")                     # ... then stop sending it (client.py)

The shared parts are in ``base.py`` (``Provider``, ``ModelWire``, error bodies, redaction);
what an HTTP status means is one table, ``status.py`` (``classify``: retry / back to admission /
fail the record / abort the run), read by the online engine, the Batch API path and admission;
the rate-limit header names admission reads are spelled in ``ratelimit.py`` only.

What a model accepts (sampling parameters, ``n``, ``seed``, the token-limit name, reasoning
controls) is one table, ``accepts.py``, with the endpoint's ``accepts`` over it; the endpoint's
``reasoning`` is mapped onto each wire by its module. Usage is decoded as billed (thinking
tokens in the completion tokens, cached input among the prompt tokens) and reasoning text goes
to ``Choice.reasoning``, never into the answer.

Everything a server sends is untrusted. ``decode`` turns any body that is not a usable reply
(bad JSON, deep nesting, wrong types, token counts out of range, a choice with no text) into a
``ReplyError``, which the client retries and then records as a failure. ``limits`` passes the
rate-limit headers through ``sane_limits``: every duration is clamped to
``[0, max_wait_s]`` and counts to finite, non-negative numbers. Error bodies of every protocol
are read by ``error_message``: control characters escaped, cut short, and passed through
``redact`` so an API key echoed by a server never reaches a log, a record or an exception.
"""

from __future__ import annotations

from collections.abc import Callable

from fairdistill.engine.accepts import accepts_for
from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.request.providers.anthropic import AnthropicProvider
from fairdistill.engine.request.providers.base import (
    MAX_CHOICES,
    MAX_WAIT_S,
    FinishReason,
    ModelWire,
    Provider,
    TokenCount,
    decode_reply,
    error_message,
    normalise_finish,
    redact,
    sane_limits,
)
from fairdistill.engine.request.providers.gemini import GeminiProvider
from fairdistill.engine.request.providers.openai import OpenAIProvider

__all__ = [
    "MAX_CHOICES", "MAX_WAIT_S", "WIRES", "FinishReason", "ModelWire", "Provider", "TokenCount",
    "decode_reply", "error_message", "make_provider", "normalise_finish", "redact", "sane_limits",
]  # fmt: skip

WIRES: dict[str, Callable[..., Provider]] = {  # the wire classes, by ``EndpointConfig.provider``
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
}


def make_provider(cfg: EndpointConfig) -> Provider:
    """The provider object for an endpoint's ``provider`` field, its ``accepts`` and ``reasoning``."""
    cls = WIRES.get(cfg.provider)
    if cls is None:
        raise ValueError(f"unknown provider {cfg.provider!r}")
    accepts = accepts_for(cfg.provider, cfg.model, cfg.accepts)
    return cls(cfg.base_url, cfg.model, cfg.max_wait_s, accepts=accepts, reasoning=cfg.reasoning)
