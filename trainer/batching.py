"""Continuous batching for a causal LM on CPU: the scheduler behind ``fair serve-student``.

Every choice of every request is a *row*. All running rows share one left-padded KV cache and
advance together, one token per step. The worker thread loops:

1. **admit** – take waiting requests while there is room (``max_batch`` rows), prefill their
   prompts together, sample each row's first token, and merge their cache into the running one
   (the shorter side is left-padded; padding is masked out);
2. **decode** – one forward pass over ``[rows, 1]`` with the cache, then sample every row with
   its own temperature / top-p and its own ``torch.Generator`` (so a seeded request gives the
   same text whoever it is batched with);
3. **retire** – rows that hit EOS, a stop string or ``max_tokens`` leave the batch at once, and
   a request is answered as soon as its last choice ends; cache columns that became padding for
   every remaining row are dropped.

A short request therefore never waits for a long neighbour, and a request arriving mid-batch
joins at the next step. Nothing here knows about HTTP: a :class:`Job` carries token ids in and
calls ``callback`` (from the worker thread) with a :class:`GenerationResult` or an exception.

Models whose cache is made of full-attention layers (Llama, Qwen2, SmolLM2, ...) are supported;
sliding-window caches are refused at start. A PEFT model may hold several LoRA adapters: rows
choose theirs per request (``adapter=None`` is the base model) and mix in one batch.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM extra: generate exactly max_tokens tokens


@dataclass
class ChoiceOut:
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    token_ids: list[int]  # generated ids, EOS included when generated (counted in usage, as vLLM does)


@dataclass
class GenerationResult:
    choices: list[ChoiceOut]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


class Job:
    """One request in flight: prompt ids, sampling parameters, and where to send the result."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        callback: Callable[[GenerationResult | BaseException], None],
        adapter: str | None = None,
    ):
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.callback = callback
        self.adapter = adapter
        self.cancelled = False  # set by the caller when nobody waits for the answer any more
        self.choices: list[ChoiceOut | None] = [None] * params.n
        self.remaining = params.n


@dataclass
class EngineStats:
    requests: int = 0  # answered
    steps: int = 0  # decode steps
    prefills: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    max_batch_seen: int = 0  # most rows in one forward pass
    row_steps: int = 0  # sum of rows over decode steps (mean batch = row_steps / steps)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch"] = round(self.row_steps / self.steps, 2) if self.steps else 0.0
        return d


@dataclass
class _Row:
    job: Job
    index: int  # which choice of the job
    generator: torch.Generator | None  # None = greedy
    tokens: list[int] = field(default_factory=list)
    scanned: int = 0  # characters of decoded text already searched for stop strings


def _row_generator(params: SamplingParams, index: int) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:  # choice 0 uses the seed itself; other choices a distinct stream derived from it
        g.manual_seed((params.seed * 1_000_003 + index) % (2**63) if index else params.seed % (2**63))
    return g


def _cache_layers(cache) -> list:
    if hasattr(cache, "layers"):
        return list(cache.layers)
    raise NotImplementedError("this transformers version's cache has no .layers; need transformers>=4.56")


def _left_pad(t: torch.Tensor, cols: int) -> torch.Tensor:
    """Left-pad the sequence axis (-2) of a ``[batch, heads, seq, dim]`` tensor with zeros."""
    return F.pad(t, (0, 0, cols, 0)) if cols else t


class BatchEngine:
    """Runs jobs in a worker thread with continuous batching. ``submit`` is thread-safe."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 16,
        max_prefill_tokens: int = 8192,
        tokenizer_lock: threading.Lock | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max(1, max_batch)
        self.max_prefill_tokens = max_prefill_tokens
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.is_peft = hasattr(model, "peft_config")
        base = model.get_base_model() if self.is_peft else model
        self.config = base.config
        params = inspect.signature(type(base).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.eos_ids = self._eos_ids(base, tokenizer)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        )
        self.stats = EngineStats()

        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._holds = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        # running state: rows, their cache, its [rows, cols] mask, and each row's pending token
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next: torch.Tensor | None = None
        self._check_cache()

    # -- public ------------------------------------------------------------------------------
    def start(self) -> BatchEngine:
        self._thread = threading.Thread(target=self._run, name="student-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._waiting.append(job)
            self._cv.notify()

    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Admit nothing new while inside (running rows go on): lets a caller queue a burst."""
        with self._cv:
            self._holds += 1
        try:
            yield
        finally:
            with self._cv:
                self._holds -= 1
                self._cv.notify()

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._rows and (self._holds or not self._waiting):
                        self._cv.wait()
                    if self._stopping:
                        break
                    admitted = self._take()
                try:
                    self._drop_cancelled()
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode()
                except Exception as exc:  # a failed step fails the requests in it, not the server
                    for job in {id(r.job): r.job for r in self._rows}.values():
                        self._fail(job, exc)
                    for job in admitted:
                        self._fail(job, exc)
                    self._reset()
        err = RuntimeError("the student server is shutting down")
        for job in {id(r.job): r.job for r in self._rows}.values():
            self._fail(job, err)
        with self._cv:
            pending, self._waiting = list(self._waiting), deque()
        for job in pending:
            self._fail(job, err)
        self._reset()

    def _take(self) -> list[Job]:
        """Waiting jobs that fit (called under the lock); the first always fits an empty batch."""
        if self._holds:
            return []
        room = self.max_batch - len(self._rows)
        taken: list[Job] = []
        longest = 0
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            longest_if = max(longest, len(job.prompt_ids))
            fits = job.params.n <= room and longest_if * (len(taken) + 1) <= self.max_prefill_tokens
            if not fits and (taken or self._rows):
                break
            self._waiting.popleft()
            taken.append(job)
            room -= job.params.n
            longest = longest_if
        return taken

    def _forward(self, cache, input_ids, mask, positions, adapters: list[str]) -> torch.Tensor:
        """Logits of the last position, ``[rows, vocab]``; ``cache`` grows in place."""
        kwargs = {self._cache_kw: cache, "use_cache": True, "logits_to_keep": 1}
        if self.is_peft:
            kwargs["adapter_names"] = adapters
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :].float()

    def _prefill(self, jobs: list[Job]) -> None:
        from transformers import DynamicCache

        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        logits = self._forward(cache, ids, mask, positions, [j.adapter or BASE_ADAPTER for j in jobs])
        self.stats.prefills += 1
        self.stats.prompt_tokens += sum(len(j.prompt_ids) for j in jobs)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(jobs))

        # one row per choice: n > 1 shares the prompt's prefill
        expand = [i for i, job in enumerate(jobs) for _ in range(job.params.n)]
        rows = [_Row(job, k, _row_generator(job.params, k)) for job in jobs for k in range(job.params.n)]
        if len(expand) != len(jobs):
            index = torch.tensor(expand)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        tokens = self._sample(logits, rows)
        live = self._advance(rows, tokens)
        if not live:
            return
        keep = torch.tensor(live)
        if len(live) != len(rows):
            cache.batch_select_indices(keep)
            mask = mask[keep]
        self._merge([rows[i] for i in live], cache, mask, torch.tensor(tokens)[keep])

    def _decode(self) -> None:
        assert self._mask is not None and self._next is not None
        self._drop_cancelled()
        if not self._rows:
            return
        mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long)], dim=1)
        positions = self._mask.sum(-1, keepdim=True)
        logits = self._forward(
            self._cache, self._next[:, None], mask, positions, [self._adapter(r) for r in self._rows]
        )
        self._mask = mask
        self.stats.steps += 1
        self.stats.row_steps += len(self._rows)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._rows))
        tokens = self._sample(logits, self._rows)
        live = self._advance(self._rows, tokens)
        self._next = torch.tensor(tokens)
        self._select(live)

    # -- state -------------------------------------------------------------------------------
    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor, pending: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch, left-padding the shorter side."""
        if not self._rows:
            self._rows, self._cache, self._mask, self._next = rows, cache, mask, pending
            return
        assert self._mask is not None and self._next is not None
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(_cache_layers(self._cache), _cache_layers(cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width - old), _left_pad(theirs.keys, width - new)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width - old), _left_pad(theirs.values, width - new)]
            )
        self._mask = torch.cat([F.pad(self._mask, (width - old, 0)), F.pad(mask, (width - new, 0))])
        self._next = torch.cat([self._next, pending])
        self._rows = self._rows + rows

    def _select(self, live: list[int]) -> None:
        """Keep only rows ``live``; then drop leading columns that are padding for all of them."""
        if len(live) == len(self._rows):
            return
        if not live:
            self._reset()
            return
        assert self._mask is not None and self._next is not None and self._cache is not None
        index = torch.tensor(live)
        self._cache.batch_select_indices(index)
        self._rows = [self._rows[i] for i in live]
        self._mask, self._next = self._mask[index], self._next[index]
        start = int(self._mask.any(0).nonzero()[0])
        if start:
            self._mask = self._mask[:, start:]
            for layer in _cache_layers(self._cache):
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]

    def _drop_cancelled(self) -> None:
        if any(r.job.cancelled for r in self._rows):
            self._select([i for i, r in enumerate(self._rows) if not r.job.cancelled])

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._next = [], None, None, None

    # -- sampling and stopping ---------------------------------------------------------------
    @staticmethod
    def _adapter(row: _Row) -> str:
        return row.job.adapter or BASE_ADAPTER

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Greedy rows take the argmax; sampled rows draw from their own generator."""
        out = logits.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if r.generator is not None]
        if sampled:
            sub = logits[torch.tensor(sampled)]
            temps = torch.tensor([rows[i].job.params.temperature for i in sampled])[:, None]
            probs = torch.softmax(sub / temps, dim=-1)
            top_p = torch.tensor([rows[i].job.params.top_p for i in sampled])
            if bool((top_p < 1.0).any()):
                sorted_p, order = probs.sort(dim=-1, descending=True)
                # keep the smallest prefix whose mass reaches top_p (the top token always stays)
                drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            for k, i in enumerate(sampled):
                out[i] = torch.multinomial(probs[k], 1, generator=rows[i].generator)[0]
        return out.tolist()

    def _advance(self, rows: list[_Row], tokens: list[int]) -> list[int]:
        """Append each row's token, retire finished rows; returns the indices still running."""
        live = []
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            row.tokens.append(tok)
            self.stats.generated_tokens += 1
            done = self._finished(row, tok)
            if done is None:
                live.append(i)
            else:
                self._finish(row, *done)
        return live

    def _finished(self, row: _Row, tok: int) -> tuple[str, str] | None:
        """``(text, finish_reason)`` when the row is done, else None."""
        p = row.job.params
        if tok in self.eos_ids and not p.ignore_eos:
            return self._decode_text(row.tokens[:-1]), "stop"
        if p.stop:
            text = self._decode_text(row.tokens)
            start = max(0, row.scanned - max(len(s) for s in p.stop) + 1)
            hits = [pos for s in p.stop if (pos := text.find(s, start)) >= 0]
            row.scanned = len(text)
            if hits:
                return text[: min(hits)], "stop"
            if len(row.tokens) >= p.max_tokens:
                return text, "length"
            return None
        if len(row.tokens) >= p.max_tokens:
            return self._decode_text(row.tokens), "length"
        return None

    def _decode_text(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, row: _Row, text: str, reason: str) -> None:
        job = row.job
        job.choices[row.index] = ChoiceOut(text, reason, list(row.tokens))
        job.remaining -= 1
        if job.remaining == 0 and not job.cancelled:
            self.stats.requests += 1
            result = GenerationResult([c for c in job.choices if c is not None], len(job.prompt_ids))
            with suppress(Exception):  # the waiter is gone; nothing to tell
                job.callback(result)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if job.remaining > 0 and not job.cancelled:
            job.remaining = 0
            with suppress(Exception):
                job.callback(exc)

    # -- setup -------------------------------------------------------------------------------
    @staticmethod
    def _eos_ids(base, tokenizer) -> set[int]:
        ids: set[int] = set()
        gen = getattr(base, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        for value in eos if isinstance(eos, list | tuple) else [eos]:
            if value is not None:
                ids.add(int(value))
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return ids

    def _check_cache(self) -> None:
        from transformers import DynamicCache

        probe = DynamicCache(config=self.config)
        if not hasattr(probe, "layers"):
            raise NotImplementedError("continuous batching needs transformers>=4.56 (cache layers)")
        if any(getattr(layer, "is_sliding", False) for layer in probe.layers):
            raise NotImplementedError(
                f"{type(self.config).__name__} uses sliding-window attention; the CPU student server "
                "supports full-attention models only"
            )
