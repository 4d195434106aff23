"""Training data: samples from run directories -> token ids and loss targets -> batches.

Masking is decided here, once (torchtune's rule): a token is trained on iff it belongs to the
assistant response. Prompt tokens *and padding* get the ignore index. (The paper's code labelled
padding too, which trains the model to emit pad tokens; here padding positions are known from
the lengths, never from the pad id, which for SmolLM2 is the same token as end-of-turn.)

Targets are stored already shifted, per example: ``targets[t]`` is the token that should follow
position ``t``, and an example's last position has no target. So a packed row never asks one
example to predict the first token of the next, whatever the model does at the seam.

Two batch layouts carry the same examples:

* **packed** (default): one row, examples back to back, ``position_ids`` restarting at 0 per
  example (RoPE sees each example from 0), no attention mask, and the example boundaries
  (``cu_seqlens``). No compute is spent on padding. Attention stays inside each example either
  way: transformers alone turns restarting position ids into a block-diagonal causal mask for
  SDPA (``masking_utils.find_packed_sequence_indices``), and ``trainer.loss``'s varlen SDPA,
  which the recipe switches on, runs one causal SDPA per example instead, so the masked-out
  blocks of that L x L mask are never computed. ``tests/test_trainer_loss.py`` checks both
  against unpacked examples.
* **padded**: ``[B, max_len]``, right padding, a 2-D attention mask.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # msgspec/orjson stay out of the import path (the GPU image lacks them)
    from fairdistill.engine.rundir.schema import Sample

IGNORE_INDEX = -100
TASKS = ("rationale", "mistake")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}  # 0 rationale, 1 mistake; -1 = no target


@dataclass(frozen=True)
class Example:
    """One tokenized sample: ``input_ids`` and per-position ``targets`` (already shifted)."""

    id: str
    problem_id: str
    task: int  # TASK_IDS value
    input_ids: list[int]
    targets: list[int]  # IGNORE_INDEX on prompt positions and on the last position

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class Batch:
    """A micro-batch ready for the model. ``task_ids`` is -1 wherever ``targets`` is ignored."""

    input_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L]
    task_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor | None  # packed: [1, L], restarting at 0 per example
    attention_mask: torch.Tensor | None  # padded: [B, L]
    n_examples: int
    n_tokens: int  # real (non-padding) tokens, prompt included: what tokens/s counts
    cu_seqlens: tuple[int, ...] | None = None  # packed: example boundaries (0, len0, len0+len1, ...)

    def to(self, device: str | torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids),  # type: ignore[arg-type]
            move(self.targets),  # type: ignore[arg-type]
            move(self.task_ids),  # type: ignore[arg-type]
            move(self.position_ids),
            move(self.attention_mask),
            self.n_examples,
            self.n_tokens,
            self.cu_seqlens,
        )

    def task_token_counts(self) -> tuple[int, int]:
        """(rationale, mistake) target tokens in this batch."""
        return int((self.task_ids == 0).sum()), int((self.task_ids == 1).sum())


# -- reading ------------------------------------------------------------------------------------


def load_samples(run_dirs: Iterable[str | Path]) -> list[Sample]:
    """Every ``samples`` record of the run directories, deduplicated by id, in a stable order."""
    from fairdistill.engine.rundir.schema import Sample
    from fairdistill.engine.rundir.store import iter_records
    from fairdistill.engine.rundir.targets import reasoning_mode, with_targets

    seen: dict[str, Sample] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not path.is_dir():
            from fairdistill.engine.errors import UsageError

            raise UsageError(f"{path}: no such run directory")
        # the target as the run's [samples] reasoning says: the answer, or <think>trace</think> + answer
        for s in with_targets(iter_records(path, "samples", Sample), reasoning_mode(path)):
            seen.setdefault(s.id, s)
    return sorted(seen.values(), key=lambda s: s.id)


def split_by_problem(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded train/validation split by problem id, so no problem is on both sides."""
    problems = sorted({s.problem_id for s in samples})
    random.Random(seed).shuffle(problems)
    n_val = round(len(problems) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(problems) > 1:
        n_val = 1
    val = set(problems[:n_val])
    return [s for s in samples if s.problem_id not in val], [s for s in samples if s.problem_id in val]


# -- tokenizing ---------------------------------------------------------------------------------


def render(tokenizer, messages: Sequence[dict], response: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` through the model's chat template.

    The prompt is tokenized exactly as at inference (``add_generation_prompt=True``); the
    response ids are the template's assistant turn after that prompt, end-of-turn token
    included (the model must learn to stop), trailing newline dropped.
    """
    prompt = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt):  # a template that rewrites earlier turns: fall back
        completion = response + (tokenizer.eos_token or "")
    else:
        completion = full[len(prompt) :].rstrip("\n")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids


def tokenize(samples: Iterable[Sample], tokenizer, max_seq_len: int) -> tuple[list[Example], dict]:
    """Tokenize samples; responses that do not fit are cut at ``max_seq_len`` (counted), and
    samples whose prompt alone fills it are dropped (counted)."""
    out: list[Example] = []
    stats = {"samples": 0, "truncated": 0, "dropped": 0}
    for s in samples:
        stats["samples"] += 1
        msgs = [{"role": m.role, "content": m.content} for m in s.messages]
        prompt_ids, response_ids = render(tokenizer, msgs, s.response)
        if len(prompt_ids) + 1 >= max_seq_len:
            stats["dropped"] += 1
            continue
        ids = prompt_ids + response_ids
        if len(ids) > max_seq_len:
            stats["truncated"] += 1
            ids = ids[:max_seq_len]
        # position t predicts ids[t+1]; only response tokens are predicted
        n_prompt = len(prompt_ids)
        targets = [IGNORE_INDEX] * (n_prompt - 1) + ids[n_prompt:] + [IGNORE_INDEX]
        out.append(Example(s.id, s.problem_id, TASK_IDS[s.task], ids, targets))
    return out, stats


# -- batching -----------------------------------------------------------------------------------


def collate_packed(examples: Sequence[Example]) -> Batch:
    """One row, no padding; position ids restart per example (block-diagonal attention)."""
    ids: list[int] = []
    targets: list[int] = []
    tasks: list[int] = []
    pos: list[int] = []
    bounds = [0]
    for ex in examples:
        ids += ex.input_ids
        targets += ex.targets
        tasks += [ex.task if t != IGNORE_INDEX else -1 for t in ex.targets]
        pos += range(len(ex.input_ids))
        bounds.append(len(ids))
    return Batch(
        input_ids=torch.tensor([ids]),
        targets=torch.tensor([targets]),
        task_ids=torch.tensor([tasks]),
        position_ids=torch.tensor([pos]),
        attention_mask=None,
        n_examples=len(examples),
        n_tokens=len(ids),
        cu_seqlens=tuple(bounds),
    )


def collate_padded(examples: Sequence[Example], pad_id: int) -> Batch:
    """``[B, max_len]`` with right padding; padding is masked out of attention *and* the loss."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)
    targets = torch.full((len(examples), width), IGNORE_INDEX)
    tasks = torch.full((len(examples), width), -1)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        t = torch.tensor(ex.targets)
        targets[i, :n] = t
        tasks[i, :n] = torch.where(t != IGNORE_INDEX, ex.task, -1)
        mask[i, :n] = 1
    return Batch(ids, targets, tasks, None, mask, len(examples), int(mask.sum()))


def collate(examples: Sequence[Example], *, packing: bool, pad_id: int = 0) -> Batch:
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)


def epoch_batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """The micro-batches of one epoch: a seeded shuffle cut into groups of ``batch_size``.

    Deterministic in (seed, epoch), so resume needs only the step number. The last group may be
    smaller. The mix of tasks inside a group is whatever the shuffle gives: one forward pass per
    step serves both loss terms.
    """
    order = list(examples)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def step_units(
    examples: Sequence[Example], batch_size: int, seed: int, epoch: int, batching: str = "mixed"
) -> list[list[list[Example]]]:
    """The step units of one epoch; a unit is the batches of one accumulation slot.

    ``mixed``: each unit is one ``epoch_batches`` group. ``paired`` (the paper's): each unit is a
    rationale batch and a mistake batch, each task shuffled on its own; the epoch has as many
    units as the larger task has batches, and the smaller task's batches cycle.
    """
    if batching == "mixed":
        return [[g] for g in epoch_batches(examples, batch_size, seed, epoch)]
    if batching != "paired":
        raise ValueError(f"batching must be mixed or paired, not {batching!r}")
    per_task = [
        epoch_batches([e for e in examples if e.task == t], batch_size, seed + t, epoch)
        for t in (TASK_IDS["rationale"], TASK_IDS["mistake"])
    ]
    n = max(len(b) for b in per_task)
    return [[b[i % len(b)] for b in per_task if b] for i in range(n)]


def units_per_epoch(examples: Sequence[Example], batch_size: int, batching: str = "mixed") -> int:
    if batching == "mixed":
        return math.ceil(len(examples) / batch_size)
    counts = [sum(e.task == t for e in examples) for t in TASK_IDS.values()]
    return max(math.ceil(c / batch_size) for c in counts)


# -- synthetic data (tests, benchmarks) ---------------------------------------------------------


def synthetic_samples(n_problems: int, seed: int = 0, mistakes_per_problem: int = 1) -> list[Sample]:
    """FAIR-shaped samples without a FAIR run: arithmetic word problems rendered with the real
    ``solve`` / ``mistake`` prompts, and step-by-step responses of varied length (a few to a few
    dozen steps, like teacher rationales) that end with the instructed answer line."""
    from fairdistill.engine.fair.prompts import prompt_set
    from fairdistill.engine.rundir.schema import Msg, Problem, Sample

    rng = random.Random(seed)
    prompts = prompt_set()
    names = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana"]
    things = ["apples", "stamps", "marbles", "books", "coins", "shells", "cards", "pencils"]

    def steps(a: int, b: int, n: int) -> str:
        lines, total = [], a
        for i in range(n):
            total += b
            lines.append(f"Step {i + 1}: after adding {b} more, the total is {total - b} + {b} = {total}.")
        return "\n".join(lines)

    out: list[Sample] = []
    for i in range(n_problems):
        a, b, k = rng.randint(2, 90), rng.randint(2, 40), rng.choice([1, 2, 3, 5, 8, 12, 20, 30])
        who, what = rng.choice(names), rng.choice(things)
        gold = a + b * k
        problem = Problem(
            id=f"syn-{i}",
            question=f"{who} has {a} {what} and gets {b} more {what} each day for {k} days. "
            f"How many {what} does {who} have now?",
            answer=str(gold),
            task="numeric",
            dataset="synthetic",
        )
        solve = [Msg(m.role, m.content) for m in prompts.render("solve", problem)]
        rationale = f"{who} starts with {a} {what}.\n{steps(a, b, k)}\nThe answer is {gold}."
        out.append(
            Sample(
                id=f"{problem.id}/sample/rationale/t0",
                problem_id=problem.id,
                task="rationale",
                messages=solve,
                response=rationale,
                teacher="t0",
            )
        )
        for j in range(mistakes_per_problem):
            wrong = f"{a} + {b} = {a + b}.\nThe answer is {a + b}."
            prompt = [
                Msg(m.role, m.content) for m in prompts.render("mistake", problem, student_answer=wrong)
            ]
            explanation = (
                f"The answer adds {b} only once, but {who} gets {b} {what} on each of {k} days.\n"
                f"{steps(a, b, rng.randint(1, k))}\nIn total {a} + {b} * {k} = {gold}.\nThe answer is {gold}."
            )
            out.append(
                Sample(
                    id=f"{problem.id}/sample/mistake/t1/{j}",
                    problem_id=problem.id,
                    task="mistake",
                    messages=prompt,
                    response=explanation,
                    teacher="t1",
                )
            )
    return out


def write_run_dir(run_dir: str | Path, samples: Iterable[Sample]) -> Path:
    """A minimal run directory holding only ``samples`` (what ``fair train`` reads)."""
    from fairdistill.engine.rundir.store import RunStore

    store = RunStore(run_dir).open(["samples"])
    for s in samples:
        store.write("samples", s)
    store.close("done")
    return Path(run_dir)
