"""Record kinds written to the run directory; the contract between engine/ and trainer/.

Every record has a stable ``id`` (problem id + stage + teacher + sample index) so resume and
dedup work by id, whatever order work finished in. The trainer imports this module only.
"""

from __future__ import annotations

from typing import Literal

import msgspec

SCHEMA_VERSION = 1

TaskType = Literal["numeric", "yesno", "choice"]


class Msg(msgspec.Struct, frozen=True):
    """A chat message: in records (``Sample.messages``) and in requests (``engine.types.Message``)."""

    role: str  # "system" | "user" | "assistant"
    content: str


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    question: str
    answer: str  # gold answer in canonical form: "18", "yes", "B"
    task: TaskType
    dataset: str = ""
    context: str | None = None  # LogiQA passage
    options: tuple[str, ...] | None = None  # LogiQA options, without the "A." prefix


class Score(msgspec.Struct, frozen=True):
    reviewer: str
    score: int | None


class Record(msgspec.Struct, kw_only=True):
    id: str
    schema_version: int = SCHEMA_VERSION


class Attempt(Record, kw_only=True):
    problem_id: str
    student: str
    sample_index: int
    text: str
    answer: str | None
    correct: bool
    prompt_version: str
    finish_reason: str | None = None
    model: str = ""  # the model the student endpoint was asked for (round 2: the served adapter)


class Rationale(Record, kw_only=True):
    """A teacher's own solution, with the outcome of gold check, review and threshold."""

    problem_id: str
    teacher: str
    text: str
    answer: str | None
    gold_match: bool | None  # final answer = gold? (recorded even with gold check off, then unused)
    gold_stated: bool | None = None  # does the gold appear anywhere in the text? (judge quality)
    scores: list[Score] = []  # one per review received (score None = unparseable)
    mean_score: float | None = None
    accepted: bool = False
    status: str = ""  # "accepted" | "rejected_gold" | "rejected_review" | "no_reviews"
    prompt_version: str = ""
    reasoning: str | None = None  # the teacher's reasoning trace, apart from the text graded and reviewed


class Feedback(Record, kw_only=True):
    """A teacher's explanation of one student mistake (gold answer given as a hint)."""

    problem_id: str
    teacher: str
    attempt_id: str
    text: str
    prompt_version: str = ""
    error_type: str | None = None  # the teacher's tag (engine.fair.errortypes), "unknown" if unparseable
    reasoning: str | None = None  # the teacher's reasoning trace, apart from the text reviewed


class Review(Record, kw_only=True):
    problem_id: str
    target_id: str  # the rationale (or feedback) reviewed
    author: str
    reviewer: str
    text: str
    score: int | None
    prompt_version: str = ""
    reasoning: str | None = None  # the reviewer's reasoning trace (the score is read from text only)


class Sample(Record, kw_only=True):
    """A training example: chat prompt + response, tagged with its task."""

    problem_id: str
    task: Literal["rationale", "mistake"]
    messages: list[Msg]  # the prompt, without the response
    response: str
    teacher: str
    scores: list[Score] = []
    source_id: str = ""  # rationale or feedback id
    prompt_version: str = ""
    answer_line_added: bool = False  # "The answer is X." appended (samples.answer_line)
    error_type: str | None = None  # mistake samples: the majority of the teachers' tags
    reasoning: str | None = None  # the teacher's reasoning trace behind ``response``, when it gave one

    def target(self, reasoning: str = "drop") -> str:
        """The training target: ``response``, after the reasoning as a ``<think>`` block when
        ``reasoning`` is ``"think"`` (``[samples] reasoning``) and the teacher gave one."""
        if reasoning == "think" and self.reasoning:
            return f"<think>\n{self.reasoning.strip()}\n</think>\n\n{self.response}"
        return self.response


class Failure(Record, kw_only=True):
    problem_id: str
    stage: str
    reason: str


class ProblemDone(Record, kw_only=True):
    """Written last for a problem, so resume knows it is finished (id = problem id)."""

    status: str  # "correct" | "mistakes" | "partial"
    dataset: str = ""
    attempts: int = 0
    mistakes: int = 0
    rationales: int = 0
    accepted: int = 0
    feedback: int = 0
    samples: int = 0
    calls: int = 0  # API calls made for this problem (cache hits excluded)


class Response(Record, kw_only=True):
    """`fair generate`: one record per input id."""

    texts: list[str] = []
    finish_reasons: list[str | None] = []
    prompt_tokens: int = 0
    completion_tokens: int = 0  # reasoning tokens included (billed as output)
    error: str | None = None
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    reasonings: list[str | None] = []  # per text: the model's reasoning trace (None: none given)


class TraceLine(msgspec.Struct, kw_only=True):
    """What readers rely on in a ``trace/`` line (``engine.request.trace.TraceEvent`` writes it);
    a line that does not fit is damage, like a bad record."""

    endpoint: str
    model: str = ""
    latency_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    http_429: int = 0
    cache_hit: bool = False
    stage: str | None = None
    key: str | None = None  # the variable of the pool key that served it (absent: one key)
    refused: list[str] = []  # pool keys' variables that answered it 401/403 (retired)


KINDS: dict[str, type[Record]] = {
    "attempts": Attempt,
    "rationales": Rationale,
    "feedback": Feedback,
    "reviews": Review,
    "samples": Sample,
    "failures": Failure,
    "problems": ProblemDone,
    "responses": Response,
}
