"""What a simulated model says: echo, or reasoning text that is right or wrong at a set rate.

Reasoning content reads the request the way a real model would: it finds the problem by the
``Question: ...`` line of the rendered problem in the user message, and answers according to the
template that made the request (``prompt_set().identify``):

- ``solve`` / ``mistake``: a step-by-step rationale ending in "The answer is X."; X is the gold
  answer with probability ``skill``, else a plausible wrong one (numeric slip, flipped yes/no,
  another option letter);
- ``feedback``: an explanation of the student's mistake that names the gold answer, opening
  with a bracketed error-type tag (``engine.fair.errortypes``) read off the student's answer (no
  answer line: format; near the gold: arithmetic; ...), so a better student's tags move;
- ``review`` / ``review_feedback``: a short justification ending in "[k]"; k is high when the
  reviewed text's final answer is right and low when it is wrong, shifted by the reviewer's
  ``leniency`` plus gaussian noise, and sometimes (``invalid_review_rate``) unparseable.

Everything is a pure function of (profile seed, request seed, model, messages, sample index).
"""

from __future__ import annotations

import hashlib
import random
import re

from fairdistill.engine.fair.errortypes import TYPES
from fairdistill.engine.fair.prompts import identify_any, prompt_set, render_problem
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.sim.profiles import ModelProfile

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER = re.compile(r"answer is\s*:?\s*\**\s*\(?\$?\s*(-?[\d,]*\.?\d+|[A-Za-z]+)", re.IGNORECASE)
_QUOTED = re.compile(r'"""\n(.*?)\n"""', re.DOTALL)
_GOLD_HINT = re.compile(r"(?:The correct final answer is|The correct answer should be) (.+?)\.(?:\s|$)")
# how often a simulated teacher names each error type (engine.fair.errortypes.TYPES order)
_ERROR_WEIGHTS = (0.15, 0.35, 0.3, 0.12, 0.03, 0.05)


def norm(text: str) -> str:
    """Whitespace-collapsed text: the key problems and recorded texts are matched by."""
    return " ".join(text.split())


def rng_for(*parts: object) -> random.Random:
    """A deterministic RNG seeded from the parts (strings, ints, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x1f")
    return random.Random(int.from_bytes(h.digest(), "big"))


# -- answers -------------------------------------------------------------------------------------


def _fallback_extract(text: str, task: str) -> str | None:
    found = _ANSWER.findall(text)
    if found:
        value = found[-1]
    elif task == "numeric":
        nums = _NUM.findall(text)
        if not nums:
            return None
        value = nums[-1]
    else:
        return None
    value = value.strip().rstrip(".")
    if task == "numeric":
        value = value.replace(",", "")
        return value if _NUM.fullmatch(value) else None
    if task == "yesno":
        low = value.lower()
        return {"true": "yes", "false": "no"}.get(low, low) if low in ("yes", "no", "true", "false") else None
    return value.upper() if len(value) == 1 and value.isalpha() else None


def _fallback_correct(pred: str | None, gold: str, task: str) -> bool:
    if pred is None:
        return False
    if task == "numeric":
        try:
            return abs(float(pred) - float(gold)) < 1e-4 * max(1.0, abs(float(gold)))
        except ValueError:
            return False
    return pred.strip().lower() == gold.strip().lower()


def grade(text: str, problem: Problem) -> bool:
    """Whether ``text``'s final answer is the gold one (engine.fair.answers when it is available)."""
    try:
        from fairdistill.engine.fair.answers import extract_answer, is_correct
    except ImportError:
        return _fallback_correct(_fallback_extract(text, problem.task), problem.answer, problem.task)
    return bool(is_correct(extract_answer(text, problem.task), problem.answer, problem.task))


def _fmt_number(x: float) -> str:
    if abs(x - round(x)) < 1e-9:
        return str(round(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: off by a little, a ×/÷ slip, a flipped yes/no, another letter."""
    gold = problem.answer.strip()
    if problem.task == "yesno":
        return "no" if gold.lower() == "yes" else "yes"
    if problem.task == "choice":
        n = len(problem.options or ()) or 4
        letters = [chr(65 + i) for i in range(n) if chr(65 + i) != gold.upper()]
        return rng.choice(letters or ["A"])
    try:
        g = float(gold.replace(",", ""))
    except ValueError:
        return gold + "0"
    for _ in range(8):
        kind = rng.random()
        if kind < 0.55:
            cand = g + rng.choice([-1, 1]) * rng.randint(1, max(2, min(20, int(abs(g) // 4) + 2)))
        elif kind < 0.8:
            cand = g * rng.choice([2, 10])
        else:
            cand = g / rng.choice([2, 10])
        if abs(cand - g) > 1e-9 and cand >= 0:
            return _fmt_number(cand)
    return _fmt_number(g + 1)


# -- texts ---------------------------------------------------------------------------------------

_OPENERS = (
    "Let's solve this step by step.",
    "We work through the problem carefully.",
    "Let me reason about this one step at a time.",
    "First, let's restate what we know.",
)


def _rationale(problem: Problem, answer: str, correct: bool, rng: random.Random) -> str:
    lines = [rng.choice(_OPENERS)]
    if problem.task == "numeric":
        nums = _NUM.findall(problem.question)[:6]
        if nums:
            lines.append(f"The quantities given are {', '.join(nums)}.")
        lines.append("Step 1: Identify what the question asks for and which quantities it depends on.")
        if correct:
            lines.append(f"Step 2: Combining the quantities in the right order gives {answer}.")
            lines.append("Step 3: Checking the result against the question, it is consistent.")
        else:
            lines.append(f"Step 2: Combining the quantities gives {answer}.")
            lines.append("Step 3: This looks reasonable, so we keep it.")
    elif problem.task == "yesno":
        lines.append("Step 1: Recall the relevant facts about the subject of the question.")
        lines.append("Step 2: Compare those facts with what the question implies.")
        lines.append(f"Step 3: On balance, the facts point to {answer}.")
    else:
        lines.append("Step 1: Read the passage and note what it states for certain.")
        lines.append("Step 2: Test each option against those statements.")
        lines.append(f"Step 3: Only option {answer} follows from the passage.")
    lines.append(f"The answer is {answer}.")
    return "\n".join(lines)


_STUDENT = re.compile(r'(?:"""\n(.*?)\n"""|Student\'s Answer: (.*?)\nHint:)', re.DOTALL)


def _error_type(problem: Problem, gold: str, text: str, rng: random.Random) -> str:
    """What the student's text shows (no answer: format/incomplete; near the gold: arithmetic;
    a given quantity: misread; else wrong-plan); one tag in four is the teacher's own guess."""
    m = _STUDENT.search(text)
    student = (m.group(1) or m.group(2) or "") if m else ""
    if not student or rng.random() < 0.25:
        return rng.choices(TYPES, weights=_ERROR_WEIGHTS)[0]
    from fairdistill.engine.fair.answers import canonical_number, extract_answer

    pred = extract_answer(student, problem.task, mode="flexible", options=problem.options)
    if pred is None:
        return "incomplete"
    if extract_answer(student, problem.task, mode="strict", options=problem.options) is None:
        return "format"
    if problem.task != "numeric":
        return "wrong-plan"
    p, g = canonical_number(pred), canonical_number(gold)
    if p is not None and g is not None and abs(p - g) <= 0.1 * max(abs(g), 1.0):
        return "arithmetic"
    return "misread" if pred in _NUM.findall(problem.question) else "wrong-plan"


def _feedback(problem: Problem, gold: str, answer: str, rng: random.Random, tag: str) -> str:
    where = rng.choice(("in the second step", "when combining the quantities", "at the final step"))
    return "\n".join(
        (
            f"[{tag}]",
            f"The student's reasoning goes wrong {where}: it uses the wrong operation or the wrong fact, "
            "so the conclusion does not follow from the question.",
            f"The correct final answer is {gold}, not the student's.",
            "Step 1: Identify exactly what the question asks for.",
            "Step 2: Use each given quantity or fact once, in the right order.",
            f"Step 3: This leads to {answer}.",
            f"The answer is {answer}.",
        )
    )


_INVALID_REVIEWS = (
    "The solution looks mostly fine to me, though I am not fully sure about every step.",
    "Rating: good, roughly four out of five.",
    "I would give this a high score; the reasoning is clear.",
    "Score: N/A",
)


def review_text(mp: ModelProfile, problem: Problem | None, solution: str | None, rng: random.Random) -> str:
    """A justification ending in "[k]": high for a right final answer, low for a wrong one."""
    solution_ok = grade(solution, problem) if problem is not None and solution is not None else None
    if rng.random() < mp.invalid_review_rate:
        return rng.choice(_INVALID_REVIEWS)
    base = 3.0 if solution_ok is None else (4.5 if solution_ok else 1.7)
    score = min(5, max(1, round(base + mp.leniency + rng.gauss(0.0, mp.review_noise))))
    if solution_ok is None:
        why = "I cannot verify every step of this solution, but the approach is reasonable."
    elif solution_ok:
        why = "The reasoning is correct, each step follows from the last, and the final answer is right."
    else:
        why = "The reasoning contains an error, and the final answer is not what the problem asks."
    return f"{why}\n[{score}]"


def generic_reply() -> str:
    """What a reasoning model says about a request it knows no problem for."""
    return (
        "I could not find enough information in the request to give a definite answer. "
        "Please provide the full problem statement."
    )


# -- the generator -------------------------------------------------------------------------------


class _AnyVersion:
    """Template names of requests made with any shipped prompt version (v1, paper)."""

    def __init__(self, prefer: str = "v1"):
        self.prefer = prefer
        self.templates = prompt_set(prefer).templates

    def identify(self, messages) -> str | None:
        return identify_any(messages, self.prefer)


class Reasoning:
    """Reasoning content over a set of known problems."""

    def __init__(self, problems: list[Problem] | None = None, prompt_version: str = "v1"):
        self.prompts = _AnyVersion(prompt_version)
        self.by_line: dict[str, list[Problem]] = {}
        for p in problems or ():
            self.add(p)

    def add(self, problem: Problem) -> None:
        key = norm(problem.question.split("\n", 1)[0])
        bucket = self.by_line.setdefault(key, [])
        if all(q.id != problem.id for q in bucket):
            bucket.append(problem)

    def find(self, user_text: str) -> Problem | None:
        """The problem a user message is about, by its ``Question:`` line (passage breaks ties)."""
        at = user_text.find("Question: ")
        if at < 0:
            return None
        end = user_text.find("\n", at)
        line = user_text[at + 10 : end if end >= 0 else len(user_text)]
        bucket = self.by_line.get(norm(line))
        if not bucket:
            return None
        if len(bucket) == 1:
            return bucket[0]
        for p in bucket:
            if render_problem(p) in user_text:
                return p
        return bucket[0]

    def reply(self, mp: ModelProfile, messages: list[dict], rng: random.Random) -> str:
        template = self.prompts.identify(messages)
        text = user_text(messages)
        problem = self.find(text)
        if problem is None:
            return generic_reply()
        if template in ("review", "review_feedback"):
            return review_text(mp, problem, split_solution(text), rng)
        if template == "feedback":
            hint = _GOLD_HINT.search(text)
            gold = hint.group(1) if hint else problem.answer
            answer = gold if rng.random() >= mp.feedback_error_rate else wrong_answer(problem, rng)
            return _feedback(problem, gold, answer, rng, _error_type(problem, gold, text, rng))
        correct = rng.random() < mp.skill  # solve, mistake, or an unknown template about a problem
        answer = problem.answer if correct else wrong_answer(problem, rng)
        return _rationale(problem, answer, correct, rng)


def user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content or ""
    return ""


def split_solution(user_text: str) -> str | None:
    """The reviewed text inside the last triple-quoted block of a review request."""
    blocks = _QUOTED.findall(user_text)
    return blocks[-1] if blocks else None
