"""Versioned prompt templates, kept in files (``prompts/<version>/<name>.txt``).

A template file has a ``### system`` and a ``### user`` section; ``{placeholders}`` are filled
with ``str.format``. ``problem`` renders a Problem (question, plus passage and options for
multiple choice), ``answer_format`` is the per-task answer instruction and ``error_type_format``
asks a teacher for the student's error type (``engine.fair.errortypes``). Versions: ``v1`` (ours:
answer-line instructions) and ``paper`` (the FAIR paper's prompts (docs/architecture.md): bare
"Let's think step by step", the gold as a hint in the mistake and review prompts). The version string
goes into every record made from a template.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path

from fairdistill.engine.config import prompt_versions
from fairdistill.engine.fair.errortypes import INSTRUCTION as ERROR_TYPE_FORMAT
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.types import Message

ROOT = Path(__file__).parent
NAMES = ("solve", "feedback", "review", "review_feedback", "mistake")


def render_problem(problem: Problem) -> str:
    """The problem as the model sees it: passage, question, lettered options."""
    parts = []
    if problem.context:
        parts.append(f"Passage: {problem.context}")
    parts.append(f"Question: {problem.question}")
    if problem.options:
        parts.append("Options:\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(problem.options)))
    return "\n".join(parts)


class PromptSet:
    """All templates of one version."""

    def __init__(self, version: str = "v1", root: Path = ROOT):
        folder = root / version
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
            raise ValueError(f"prompts: unknown version {version!r} (have {known})")
        self.version = version
        self.templates: dict[str, tuple[str, str]] = {}
        for name in NAMES:
            text = (folder / f"{name}.txt").read_text()
            system, _, user = text.partition("### user\n")
            self.templates[name] = (system.removeprefix("### system\n").strip(), user.strip())
        self.answer_formats: dict[str, str] = tomllib.loads((folder / "answer_formats.toml").read_text())

    def render(self, name: str, problem: Problem, **values: str) -> tuple[Message, ...]:
        system, user = self.templates[name]
        values.setdefault("error_type_format", ERROR_TYPE_FORMAT)
        text = user.format(
            problem=render_problem(problem), answer_format=self.answer_formats[problem.task], **values
        )
        return (Message("system", system), Message("user", text))

    def identify(self, messages: list[dict] | tuple[Message, ...]) -> str | None:
        """Which template made these messages, by their system text (used by the simulator)."""
        if not messages:
            return None
        first = messages[0]
        system = first.get("content") if isinstance(first, dict) else first.content
        for name, (sys_text, _) in self.templates.items():
            if system == sys_text:
                return name
        return None


@cache
def prompt_set(version: str = "v1") -> PromptSet:
    return PromptSet(version)


def versions(root: Path = ROOT) -> list[str]:
    """Every prompt version shipped (folders of ``prompts/``; ``engine.config`` lists the same)."""
    return prompt_versions(root)


def identify_any(messages: list[dict] | tuple[Message, ...], prefer: str = "v1") -> str | None:
    """The template name, whichever shipped version made the messages (``prefer`` is tried first)."""
    for v in [prefer, *(x for x in versions() if x != prefer)]:
        name = prompt_set(v).identify(messages)
        if name is not None:
            return name
    return None
