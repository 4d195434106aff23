"""Replay: serve text real models wrote, from the FAIR paper's release and GSM8K model solutions.

Sources (under ``$FAIR_DATA_DIR`` or ``<repo>/../shared/datasets``):

- ``fair-release/Llama-2-7b-chat-hf_svamp_rationale_round0.json``: per question, each teacher's
  rationale as ``[text, score1, score2]`` (fields ``gpt_rationale``, ``gemini_rationale``,
  ``mistral_rationale``);
- ``..._svamp_feedback_round0.json``: each teacher's explanation of the student's mistake;
- ``..._svamp_false_round0.json``: the student's (Llama-2-7b-chat) wrong answer;
- ``gsm8k/example_model_solutions.jsonl``: real 6B/175B solutions, served as student answers.

A replay model has a ``replay_author`` (gpt | gemini | mistral; by default its model name) and
answers ``solve`` with that teacher's recorded rationale, ``feedback`` with its recorded feedback,
and ``review`` with the score it gave in the paper, as "... [k]". A model with ``role =
"student"`` answers ``solve``/``mistake`` with the recorded wrong answer (SVAMP) or one of the
recorded solutions (GSM8K, picked by seed). Anything not recorded (a self-review, a review of a
feedback text, an unknown question) falls back to reasoning content over the same problems.

**Assumption — who gave which score.** The release stores two scores per rationale without
naming the reviewers. We follow the paper repository's convention that the reviewers are the
other two teachers in the fixed order gpt, gemini, mistral: gpt's rationale is scored by
(gemini, mistral), gemini's by (gpt, mistral), mistral's by (gpt, gemini). ``REVIEWERS`` holds it.
"""

from __future__ import annotations

import ast
import json
import os
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from fairdistill.engine.errors import FairError
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.sim.content import Reasoning, norm, review_text, split_solution, user_text
from fairdistill.engine.sim.profiles import ModelProfile

AUTHORS = ("gpt", "gemini", "mistral")
REVIEWERS: dict[str, tuple[str, str]] = {
    "gpt": ("gemini", "mistral"),
    "gemini": ("gpt", "mistral"),
    "mistral": ("gpt", "gemini"),
}
RELEASE = "fair-release"
SVAMP_PREFIX = "Llama-2-7b-chat-hf_svamp"
GSM8K_SOLUTIONS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
REPO_ROOT = Path(__file__).resolve().parents[2]


class ReplayDataMissing(FairError):
    """The recorded data replay needs is not on this machine."""


def data_dir() -> Path | None:
    """``$FAIR_DATA_DIR``, else ``<repo>/../shared/datasets``; None when neither exists."""
    env = os.environ.get("FAIR_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "datasets"]:
        if candidate.is_dir():
            return candidate
    return None


@dataclass
class ReplayItem:
    """One recorded question with every text the release holds for it."""

    id: str
    question: str
    gold: str
    dataset: str
    rationales: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # author -> text, scores
    feedback: dict[str, str] = field(default_factory=dict)
    student_answers: list[str] = field(default_factory=list)

    def problem(self) -> Problem:
        return Problem(
            id=self.id, question=self.question, answer=self.gold, task="numeric", dataset=self.dataset
        )

    def score(self, author: str, reviewer: str) -> int | None:
        """The score ``reviewer`` gave ``author``'s rationale (None when not recorded)."""
        if author not in self.rationales or reviewer not in REVIEWERS.get(author, ()):
            return None
        scores = self.rationales[author][1]
        slot = REVIEWERS[author].index(reviewer)
        return scores[slot] if slot < len(scores) else None


class ReplayData:
    """Recorded texts indexed by question (and rationales by text, to find who wrote one)."""

    def __init__(self, root: Path):
        self.root = root
        self.items: dict[str, ReplayItem] = {}
        self.by_text: dict[str, tuple[ReplayItem, str]] = {}
        self._load_svamp(root / RELEASE)
        self._load_gsm8k(root / "gsm8k" / "example_model_solutions.jsonl")
        if not self.items:
            raise ReplayDataMissing(f"replay: no recorded data under {root} ({RELEASE}/, gsm8k/)")

    @classmethod
    def load(cls, root: str | Path | None = None) -> ReplayData:
        """From ``root`` (a datasets folder), else ``$FAIR_DATA_DIR`` / ``../shared/datasets``."""
        path = Path(root) if root else data_dir()
        if path is None or not path.is_dir():
            raise ReplayDataMissing(
                "replay: reference datasets not found; set FAIR_DATA_DIR to the folder holding "
                f"{RELEASE}/ and gsm8k/ (looked in {path or REPO_ROOT.parent / 'shared' / 'datasets'})"
            )
        return _load_cached(path.resolve())

    def _load_svamp(self, folder: Path) -> None:
        rationale = folder / f"{SVAMP_PREFIX}_rationale_round0.json"
        if not rationale.is_file():
            return
        for row in json.loads(rationale.read_text()):
            item = self._item(row, "svamp")
            for author in AUTHORS:
                rec = row.get(f"{author}_rationale")
                if rec:
                    item.rationales[author] = (rec[0], [int(s) for s in rec[1:]])
                    self.by_text.setdefault(norm(rec[0]), (item, author))
        feedback = folder / f"{SVAMP_PREFIX}_feedback_round0.json"
        if feedback.is_file():
            for row in json.loads(feedback.read_text()):
                item = self._item(row, "svamp")
                for author in AUTHORS:
                    if row.get(f"{author}_feedback"):
                        item.feedback[author] = row[f"{author}_feedback"]
        false = folder / f"{SVAMP_PREFIX}_false_round0.json"
        if false.is_file():
            for row in json.loads(false.read_text()):
                item = self._item(row, "svamp")
                if row.get("student_wrong_pred") and not item.student_answers:
                    item.student_answers.append(row["student_wrong_pred"])

    def _item(self, row: dict, dataset: str) -> ReplayItem:
        key = norm(row["question"])
        item = self.items.get(key)
        if item is None:
            item = ReplayItem(
                id=f"{dataset}-fair-{row.get('id', len(self.items))}",
                question=row["question"].strip(),
                gold=str(row.get("gold_answer", "")).strip(),
                dataset=dataset,
            )
            self.items[key] = item
            if row.get("student_wrong_pred"):
                item.student_answers.append(row["student_wrong_pred"])
        return item

    def _load_gsm8k(self, path: Path) -> None:
        if not path.is_file():
            return
        with path.open() as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                key = norm(row["question"])
                if key in self.items:
                    continue
                gold = row.get("ground_truth", "").rsplit("A:", 1)[-1].rsplit("####", 1)[-1].strip()
                item = ReplayItem(
                    id=f"gsm8k-solutions-{n}", question=row["question"].strip(), gold=gold, dataset="gsm8k"
                )
                for name in GSM8K_SOLUTIONS:
                    value = row.get(name)
                    if isinstance(value, str):  # the documented form: a Python-literal dict
                        value = ast.literal_eval(value)
                    if isinstance(value, dict) and value.get("solution"):
                        item.student_answers.append(value["solution"])
                self.items[key] = item

    # -- lookups -------------------------------------------------------------------------------

    def find(self, text: str) -> ReplayItem | None:
        """The recorded item a user message is about, by its ``Question:`` line."""
        at = text.find("Question: ")
        if at < 0:
            return None
        end = text.find("\n", at)
        return self.items.get(norm(text[at + 10 : end if end >= 0 else len(text)]))

    def author_of(self, rationale: str, item: ReplayItem | None = None) -> tuple[ReplayItem, str] | None:
        """Who wrote a rationale: looked up in the question's own item first, since short texts
        ("16 pounds") recur across questions with different recorded scores."""
        key = norm(rationale)
        if item is not None:
            for author, (text, _) in item.rationales.items():
                if norm(text) == key:
                    return item, author
        return self.by_text.get(key)

    def problems(self, dataset: str | None = "svamp") -> list[Problem]:
        """The recorded questions as Problems (``dataset=None``: all of them)."""
        return [it.problem() for it in self.items.values() if dataset is None or it.dataset == dataset]

    # -- replies -------------------------------------------------------------------------------

    def reply(
        self,
        mp: ModelProfile,
        model: str,
        template: str | None,
        messages: list[dict],
        rng: random.Random,
        fallback: Reasoning,
    ) -> str:
        text = user_text(messages)
        item = self.find(text)  # every recorded problem is also known to ``fallback``
        if mp.role == "student":
            if item is not None and item.student_answers and template in ("solve", "mistake", None):
                return item.student_answers[rng.randrange(len(item.student_answers))]
            return fallback.reply(mp, messages, rng)
        author = mp.replay_author or model
        if item is not None and template == "solve" and author in item.rationales:
            return item.rationales[author][0]
        if item is not None and template == "feedback" and author in item.feedback:
            return item.feedback[author]
        if template == "review":
            solution = split_solution(text)
            found = self.author_of(solution, item) if solution else None
            if found is not None:
                rec_item, rec_author = found
                score = rec_item.score(rec_author, author)
                if score is not None:
                    note = f"Recorded peer review ({author} on {rec_author}'s rationale, FAIR release)."
                    return f"{note}\n[{score}]"
                return review_text(mp, rec_item.problem(), solution, rng)
        return fallback.reply(mp, messages, rng)


@cache
def _load_cached(path: Path) -> ReplayData:
    return ReplayData(path)
