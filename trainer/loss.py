"""The FAIR loss: ``L = α·L_mistake + (1-α)·L_rationale`` from one mixed batch.

Each term is a token mean over its own task's response tokens, so a long mistake explanation
does not outweigh a short rationale just by length, and α alone sets the balance (α=0.5 default,
as in the paper). Both terms come from ONE forward pass over a batch that mixes the two tasks:
per-token cross-entropy (``reduction="none"``) split by a task mask.

**Normalising across micro-batches (torchtune's rule).** With gradient accumulation the token
counts are taken over the whole optimizer step before any forward pass::

    L_step = α · Σ_m ce_sum_mistake(m) / N_mistake  +  (1-α) · Σ_m ce_sum_rationale(m) / N_rationale

and each micro-batch backpropagates its own share of that sum (``micro_loss``). The gradients
then add up to exactly those of one big batch, whatever the lengths of the micro-batches.
(nanoGPT's ``loss / grad_accum_steps`` would weight the tokens of a short micro-batch more.)

**A step with only one task present.** The missing term contributes 0 and the weights are *not*
renormalised: a rationale-only step is trained with weight (1-α), not 1. The loss then varies
continuously with the data: a step with one mistake token and a step with none differ by one
token's worth, instead of the rationale weight jumping from 1-α to 1. A step with no target
tokens at all gives a zero loss that still carries a graph, so ``backward()`` is a no-op.

**Logits only where they are needed.** The output projection (49152 × 576 for SmolLM2, about a
fifth of the model's FLOPs per token) runs only on positions that have a target, i.e. the
response tokens; prompt positions never get logits. Above ``chunk`` target tokens the projection
and cross-entropy run in checkpointed chunks, so full-vocabulary fp32 logits never exist for
the whole batch at once (on a GPU batch of 64k tokens they would take ~30 GB).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fairdistill.trainer.data import IGNORE_INDEX, Batch

MISTAKE, RATIONALE = 1, 0


@dataclass
class TaskTokens:
    """Target-token counts per task over one optimizer step (all of its micro-batches)."""

    rationale: int = 0
    mistake: int = 0

    @classmethod
    def of(cls, batches: list[Batch]) -> TaskTokens:
        out = cls()
        for b in batches:
            r, m = b.task_token_counts()
            out.rationale += r
            out.mistake += m
        return out


def _ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


def token_ce(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``targets`` (no ignore entries).

    Logits are made in fp32 for the softmax. Above ``chunk`` rows, each chunk is checkpointed:
    its logits are freed after the forward and recomputed in the backward.
    """
    if hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return _ce(hidden, weight, targets)
    parts = [
        checkpoint(_ce, h, weight, t, use_reentrant=False)
        for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    ]
    return torch.cat(parts)


# -- varlen attention for packed rows -------------------------------------------------------------

PACKED_ATTENTION = "fair_packed_sdpa"


def _packed_sdpa(module, query, key, value, attention_mask, fair_cu_seqlens=None, **kwargs):
    """SDPA over a packed row, one causal call per example (``fair_cu_seqlens`` = boundaries).

    transformers' own packed path gives SDPA a dense L x L block-diagonal mask: correct, but on
    CPU it computes every masked-out block and keeps the L x L weights for the backward (one
    1,200-token row of 4 SVAMP examples: ~40 % of the step). Slicing q/k/v per example costs
    only the causal attention each example needs. Without boundaries, or with a padding mask,
    it is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if fair_cu_seqlens is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outs = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True, **kwargs
        )[0]
        for a, b in itertools.pairwise(fair_cu_seqlens)
    ]
    return torch.cat(outs, dim=1), None


def _packed_mask(*args, attention_mask=None, **kwargs):
    """No 2-D padding mask -> no 4-D mask at all (causality is per example, in ``_packed_sdpa``)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def enable_packed_attention(model) -> bool:
    """Switch an SDPA model to the varlen SDPA above (a runtime setting: nothing of it is saved,
    and generation is unaffected). Returns whether it is on; other implementations are left alone
    (flash-attention-2 already runs packed rows varlen from their position ids)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa":
        return base.config._attn_implementation == PACKED_ATTENTION
    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return base.config._attn_implementation == PACKED_ATTENTION


# Architectures whose logits are exactly ``lm_head(final hidden state)`` (no soft-capping, no
# logit scale), so the head can be applied to the response positions only.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"}


def per_token_loss(model, batch: Batch, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> ``(ce, task)``: the cross-entropy of every target token and its task id.

    ``model`` is a causal LM, plain or wrapped by peft. Positions without a target are dropped
    before the output projection (see the module docstring); other architectures fall back to
    the full ``logits`` output.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = batch.targets != IGNORE_INDEX
    targets = batch.targets[keep]
    task = batch.task_ids[keep]
    inputs: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,  # a cache would also switch off the packed-sequence mask
    }
    if batch.cu_seqlens is not None and base.config._attn_implementation == PACKED_ATTENTION:
        inputs["fair_cu_seqlens"] = batch.cu_seqlens
    if base.config.model_type in _PLAIN_HEAD:
        hidden = base.get_decoder()(**inputs).last_hidden_state
        weight = base.get_output_embeddings().weight
        return token_ce(hidden[keep], weight, targets, chunk), task
    logits = model(**inputs).logits
    return F.cross_entropy(logits[keep].float(), targets, reduction="none"), task


def combine(
    ce: torch.Tensor, task: torch.Tensor, alpha: float, n_mistake: int, n_rationale: int
) -> torch.Tensor:
    """α · Σce[mistake] / n_mistake + (1-α) · Σce[rationale] / n_rationale.

    ``n_*`` are the step's token counts (over all micro-batches), so summing this over the
    micro-batches of a step gives the step's loss. A task with no tokens contributes 0.
    """
    loss = ce.sum() * 0.0  # keeps a graph even when both terms are empty
    if n_mistake:
        loss = loss + alpha * ce[task == MISTAKE].sum() / n_mistake
    if n_rationale:
        loss = loss + (1 - alpha) * ce[task == RATIONALE].sum() / n_rationale
    return loss


def micro_loss(model, batch: Batch, alpha: float, step_tokens: TaskTokens) -> tuple[torch.Tensor, dict]:
    """A micro-batch's share of the step loss, plus detached per-task sums for logging."""
    ce, task = per_token_loss(model, batch)
    loss = combine(ce, task, alpha, step_tokens.mistake, step_tokens.rationale)
    with torch.no_grad():
        stats = {
            "ce_mistake": float(ce[task == MISTAKE].sum()),
            "ce_rationale": float(ce[task == RATIONALE].sum()),
        }
    return loss, stats


def fair_loss(model, batch: Batch, alpha: float = 0.5) -> torch.Tensor:
    """The loss of a single batch (no accumulation): what ``micro_loss`` sums to for one batch."""
    return micro_loss(model, batch, alpha, TaskTokens.of([batch]))[0]
