"""Dollars of one call as billed: input, cached input, cache writes and output at their prices.

``Prices.of(cfg, factor)`` holds an endpoint's prices per token (``factor``: a Batch API's
discount); ``cost`` prices token counts, whether from a ``Usage`` (the engine) or a trace line
(``--estimate``). Cached and cache-write tokens are part of the prompt tokens and priced at
``price_cached_in`` / ``price_cache_write`` instead of ``price_in`` (each defaults to it); reasoning
tokens are part of the completion tokens, priced as output.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairdistill.engine.config import EndpointConfig


@dataclass(frozen=True, slots=True)
class Prices:
    """$ per token of one endpoint."""

    input: float
    output: float
    cached: float
    cache_write: float

    @classmethod
    def of(cls, cfg: EndpointConfig, factor: float = 1.0) -> Prices:
        per = factor / 1e6
        cached = cfg.price_cached_in if cfg.price_cached_in is not None else cfg.price_in
        write = cfg.price_cache_write if cfg.price_cache_write is not None else cfg.price_in
        return cls(cfg.price_in * per, cfg.price_out * per, cached * per, write * per)

    def cost(self, prompt: int, completion: int, cached: int = 0, cache_write: int = 0) -> float:
        fresh = max(0, prompt - cached - cache_write)
        return (
            fresh * self.input
            + cached * self.cached
            + cache_write * self.cache_write
            + completion * self.output
        )
