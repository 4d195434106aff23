"""Answer extraction and grading for the three task types: numeric, yes/no, multiple choice.

    extract_answer(text, task, mode="flexible")  -> the model's final answer, canonical, or None
    is_correct(pred, gold, task)                 -> does a canonical answer match the gold?
    grade(text, gold, task)                      -> (pred, correct), the two in one call
    canonical_number(s)                          -> the value of a number string, or None

Two modes, as in lm-evaluation-harness's GSM8K task:

* ``strict``: only an explicit answer statement counts. The markers are "The (final) answer
  is X", "Answer: X", "#### X" (GSM8K), ``\\boxed{X}`` (LaTeX) and, for numeric tasks, a line
  starting "A: X" (the GSM8K example solutions). The last marker in the text that carries an
  answer wins. A reply that is nothing but the answer ("18", "Yes.", "(B)") counts as well.
* ``flexible``: the strict answer if there is one, else a fallback: the number the final
  statement gives (numeric; ``final_statement_number``: a sentence-level rule, so "Emily used a
  total of 52 beads for her 44 friends." gives 52, not the trailing 44; given the ``question``,
  the number of the unit "how many X" asks for wins); a reply opening with
  "Yes"/"No", else the last yes/no/true/false word (yesno); the
  last "(B)" / "option B" / trailing bare letter, else a unique option-text match (choice).

Numbers are compared as numbers, never as strings: "1,234" = "1234", "$18.00" = "18",
"3/4" = "0.75", "1 1/2" = "1.5". Fractions are compared exactly as rationals; otherwise
``math.isclose(rel_tol=1e-6, abs_tol=1e-6)``. A percentage matches either its written value or
that value / 100 ("50%" matches gold "50" and gold "0.5"), whichever side carries the "%".

Pure Python (re, fractions): the trainer imports this module too.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from fractions import Fraction

TASKS = ("numeric", "yesno", "choice")
MODES = ("strict", "flexible")
REL_TOL = 1e-6
ABS_TOL = 1e-6
LETTERS = "ABCD"

# ---------------------------------------------------------------------------------------------
# numbers

_NUMBER = re.compile(
    r"""
    (?<![\w.])(?<!\d:)                  # not glued to a word or number, nor a clock time's minutes
    (?P<sign>[-−])?\s?
    (?:[$€£]\s?)?
    (?P<body>
        \d+\ \d+/\d+(?![\d/])           # mixed number: 1 1/2
      | \d+/\d+(?![\d/])                # fraction: 3/4
      | \d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d) # thousands separators: 1,234.50
      | \d+(?:\.\d+)?                   # 18, 18.5
      | \.\d+                           # .5
    )
    (?!:\d)                             # not a clock time's hours: 5:00
    (?P<pct>\s?%|\s?percent\b)?
    """,
    re.VERBOSE | re.IGNORECASE,
)
_WHOLE_NUMBER = re.compile(r"\s*[*_`(]*\s*(?:" + _NUMBER.pattern + r")\s*[*_`)]*\s*\.?\s*", re.VERBOSE | re.I)


def _body_value(body: str) -> Fraction | None:
    body = body.replace(",", "")
    try:
        if " " in body:  # mixed number
            whole, frac = body.split(" ", 1)
            return Fraction(int(whole)) + Fraction(frac)
        return Fraction(body)
    except (ValueError, ZeroDivisionError):
        return None


def _match_value(m: re.Match[str]) -> tuple[Fraction, bool] | None:
    value = _body_value(m.group("body"))
    if value is None:
        return None
    if m.group("sign"):
        value = -value
    return value, bool(m.group("pct"))


def _parse(s: str) -> tuple[Fraction, bool] | None:
    """A whole string as a number: (exact value, written as a percentage?), or None."""
    if not isinstance(s, str):
        return None
    m = _WHOLE_NUMBER.fullmatch(_delatex(s))
    return _match_value(m) if m else None


def canonical_number(s: str) -> float | None:
    """The value of a number string ("1,234", "$18.00", "-3", "3/4", "1 1/2", "50%" -> 50.0).

    Surrounding markup and a currency sign are allowed; anything else (words, units,
    expressions) gives None: use ``extract_answer`` to find a number inside text.
    """
    parsed = _parse(s)
    return float(parsed[0]) if parsed else None


def format_number(value: Fraction | float | int) -> str:
    """Canonical text of a number: "18" not "18.0"; "0.75"; "1/3" where no finite decimal exists."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value!r}")
        value = Fraction(repr(value))  # the shortest decimal that round-trips: 0.1 -> "0.1"
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def _numbers_match(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    left = [a[0], a[0] / 100] if a[1] else [a[0]]
    right = [b[0], b[0] / 100] if b[1] else [b[0]]
    for x in left:
        for y in right:
            if x == y or math.isclose(float(x), float(y), rel_tol=REL_TOL, abs_tol=ABS_TOL):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# text clean-up

_CALC = re.compile(r"<<[^<>\n]*>>")  # GSM8K calculator annotations: <<16-3=13>>
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _delatex(text: str) -> str:
    """Turn the LaTeX that models put around numbers into plain text ("\\frac{3}{4}" -> "3/4")."""
    if "\\" not in text and "{," not in text and "−" not in text:
        return text
    text = text.replace("−", "-")
    text = _TEXT_CMD.sub(r" \1", text)
    text = _FRAC.sub(
        lambda m: f"{m[1]}/{m[2]}" if m[1].isdigit() and m[2].isdigit() else f"({m[1]})/({m[2]})", text
    )
    text = text.replace("{,}", ",").replace("\\$", "$").replace("\\%", "%")
    text = re.sub(r"\\[,;:! ]", "", text)
    text = re.sub(r"\\(?:left|right)\b", "", text)
    text = re.sub(r"\\(?:times|cdot)\b", " × ", text)
    return text


def _clean(text: str) -> str:
    return _delatex(_CALC.sub("", text))


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of every ``\\boxed{...}`` / ``\\fbox{...}``, nested braces allowed."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end() : i - 1]))
    return out


# Explicit answer statements; the tail after the match holds the answer.
_M = r"[*_]*"  # markdown emphasis around a marker: **Answer:** 18
_MARKERS = [
    re.compile(rf"{_M}\b(?:the\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?answer{_M}\s+is{_M}\s*:?", re.I),
    re.compile(rf"{_M}\b(?:final\s+|correct\s+)?answer{_M}\s*:{_M}", re.I),
    re.compile(r"####"),
]
_NUMERIC_MARKERS = [*_MARKERS, re.compile(rf"^[ \t]*{_M}A{_M}\s*:{_M}", re.M)]  # GSM8K: "A: 18"
_CHOICE_MARKERS = [
    *_MARKERS,
    re.compile(rf"\b(?:the\s+)?(?:correct|right|best)\s+(?:option|choice){_M}\s+is{_M}\s*:?", re.I),
]


def _tail(text: str, start: int) -> str:
    """The answer segment after a marker: the rest of its line up to the end of the sentence.

    When the marker ends its line ("Answer:\\n18"), the next non-empty line is taken only if it
    is short and no labelled step ("Total: 3 + 4 = 7"): a marker that opens a whole worked
    solution is not an answer statement.
    """
    rest = text[start:]
    line, _, after = rest.partition("\n")
    if not re.search(r"\w", line):
        nxt = next((ln for ln in after.split("\n") if ln.strip()), "")
        line = nxt if len(nxt.strip()) <= 40 and not re.search(r"[=:]", nxt) else ""
    return re.split(r"\.(?:\s|$)|;|\?|!", line, maxsplit=1)[0]


def _marker_spans(text: str, markers: list[re.Pattern[str]]) -> list[tuple[int, str]]:
    """(position, tail) of every answer statement, in text order."""
    spans = [(m.start(), _tail(text, m.end())) for rx in markers for m in rx.finditer(text)]
    spans += _boxed(text)
    return sorted(spans, key=lambda s: s[0])


# ---------------------------------------------------------------------------------------------
# per-task extraction


def _number_in(segment: str) -> str | None:
    """The number an answer segment states: "18 dollars (9 x 2)" -> 18, but "290 / 2 = 145" ->
    145 and "Helen baked 46 yesterday, so she baked 20" -> 20 (a sentence ends on its result)."""
    if "=" in segment:
        segment = segment.rsplit("=", 1)[1]
    found = list(_NUMBER.finditer(segment))
    if not found:
        return None
    leads = not re.search(r"[^\W_]", segment[: found[0].start()])
    return _render(found[0] if leads else found[-1])


def _render(m: re.Match[str]) -> str | None:
    parsed = _match_value(m)
    if parsed is None:
        return None
    return format_number(parsed[0]) + ("%" if parsed[1] else "")


def _extract_numeric(text: str, mode: str, question: str | None = None) -> str | None:
    text = _clean(text)
    whole = _WHOLE_NUMBER.fullmatch(text)
    if whole:
        return _render(whole)
    for _, segment in reversed(_marker_spans(text, _NUMERIC_MARKERS)):
        found = _number_in(segment)
        if found is not None:
            return found
    if mode == "strict":
        return None
    return final_statement_number(text, question)


# -- the final statement of free-form text (no answer marker) -----------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n+")
_PAREN = re.compile(r"\([^()]*\)")
_CLAUSE = re.compile(r",\s+|;\s+|\s+which\s+|\s+so\s+|\s+and\s+(?:so|thus|therefore)\s+", re.I)
_CUE = re.compile(r"\b(?:total\s+of|in\s+total|in\s+all|altogether|equals?|is|are|was|were)\b", re.I)
# a number right after one of these is a detail ("with 104 dollars", "during the 19 weeks")
_DETAIL = re.compile(
    r"\b(?:with|at|during|to|for|of|per|from|on|in|than|by|after|before|among|over|out|each|every"
    r"|have|left|join)\s+(?:the\s+|a\s+|an\s+|his\s+|her\s+|their\s+|its\s+)?\$?$",
    re.I,
)


def final_statement(text: str) -> str | None:
    """The last sentence (or line) of the text that holds a number, parentheses dropped."""
    for sentence in reversed(_SENTENCE_END.split(text)):
        bare = _PAREN.sub("", sentence)
        if _NUMBER.search(bare):
            return bare
    return None


# "How many (more) sacks of oranges ..." -> "sacks": the unit the question asks a count of
_ASKED_UNIT = re.compile(
    r"\bhow\s+many\s+(?:(?:more|fewer|less|total|different|new|extra|additional)\s+)*([a-z][a-z-]*)", re.I
)
_UNIT_AFTER = re.compile(
    r"\s*(?:(?:more|fewer|less|additional|extra|new|other|different|total)\s+)*([a-z][a-z-]*)", re.I
)
_RATE = re.compile(r"\s*(?:/|per\b|each\b|in\s+each\b|a\s+(?:day|week|month|year)\b)", re.I)
# a sentence opening with a subordinate clause ("Since ..., ...") asserts its result after a comma
_SUBORDINATE = re.compile(
    r"^\W*(?:(?:so|thus|hence|therefore)\s*,?\s*)?"
    r"(?:since|because|as|if|when|while|although|given|before|after|once|until)\b",
    re.I,
)
_TOTAL_OF = re.compile(r"\btotal\s+of\b", re.I)
# a trailing clause that explains rather than asserts: ", as she has already put in 2 cups ..."
_TRAILING = re.compile(r",\s+(?:as|since|because|while|which|so\s+that|leaving|making)\b", re.I)


def asked_unit(question: str | None) -> str | None:
    """The unit a "how many X" question counts ("how many more cakes ..." -> "cakes"), or None."""
    m = _ASKED_UNIT.search(question or "")
    return m[1].lower() if m else None


def _stem(word: str) -> str:
    word = word.lower()
    if re.search(r"(?:ch|sh|ss|x|us)es$", word):
        return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def _unit_number(statement: str, unit: str) -> re.Match[str] | None:
    """The number in the statement that counts the asked unit ("390 sacks of ..."), not a rate
    ("15 people/seat"): the first after the last "total of" of the main clause (trailing ", as /
    leaving / ..." clauses explain); in a sentence that opens with a subordinate clause ("Since
    ..., ..."), the first in the last comma-separated part that has one; else the first."""
    stem = _stem(unit)

    def first(start: int = 0, end: int | None = None) -> re.Match[str] | None:
        for m in _NUMBER.finditer(statement, start, len(statement) if end is None else end):
            w = _UNIT_AFTER.match(statement, m.end())
            if w and _stem(w[1]) == stem and not _RATE.match(statement, w.end()):
                return m
        return None

    main = _TRAILING.split(statement, maxsplit=1)[0]
    totals = list(_TOTAL_OF.finditer(main))
    if totals and (m := first(totals[-1].end(), len(main))) is not None:
        return m
    if _SUBORDINATE.match(statement):
        cuts = [c.end() for c in re.finditer(r",\s+", statement)] + [len(statement)]
        for lo, hi in reversed(list(itertools.pairwise(cuts))):
            if (m := first(lo, hi)) is not None:
                return m
    return first()


def final_statement_number(text: str, question: str | None = None) -> str | None:
    """The number the final statement gives as its result, by a sentence-level rule.

    In the last sentence with a number: the result of its last "=", if that starts the rest;
    else, when a ``question`` asks "how many X", the first number of X in it ("20 Ferris wheels
    can hold 5700 people" -> 5700 for "how many people"; not a rate "15 people/seat"); else, in its
    last clause with a number, the first number after the last "total of / in all / is / are /
    equals" cue; else the first number that is not a detail introduced by a preposition ("You
    can buy 4 packs with 104 dollars" -> 4); else the last number. The gold is never consulted.
    ``tests/test_answers.py`` measures it on the FAIR release (confusion table with ``-s``).
    """
    s = final_statement(text)
    if s is None:
        return None
    if "=" in s:
        seg = s.rsplit("=", 1)[1]
        nums = list(_NUMBER.finditer(seg))
        if nums and not re.search(r"[^\W_]", seg[: nums[0].start()]):
            return _render(nums[0])
        if nums:
            s = seg
    unit = asked_unit(question)
    if unit is not None and (m := _unit_number(s, unit)) is not None:
        return _render(m)
    clause = [c for c in _CLAUSE.split(s) if _NUMBER.search(c)][-1]
    nums = list(_NUMBER.finditer(clause))
    cues = list(_CUE.finditer(clause))
    if cues:
        after = [m for m in nums if m.start() >= cues[-1].end()]
        if after:
            return _render(after[0])
    free = [m for m in nums if not _DETAIL.search(clause[: m.start()])]
    return _render(free[0] if free else nums[-1])


_YESNO = re.compile(r"\b(yes|no|true|false)\b", re.I)
_YESNO_CANON = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def _extract_yesno(text: str, mode: str) -> str | None:
    text = _clean(text)
    bare = re.fullmatch(r"\W*(yes|no|true|false)\W*", text, re.I)
    if bare:
        return _YESNO_CANON[bare[1].lower()]
    for _, segment in reversed(_marker_spans(text, _MARKERS)):
        head = re.match(r"\W*(yes|no|true|false)\b", segment, re.I)
        if head:
            return _YESNO_CANON[head[1].lower()]
    if mode == "strict":
        return None
    opening = re.match(r"\W*(yes|no)\b", text, re.I)
    if opening:
        return _YESNO_CANON[opening[1].lower()]
    found = _YESNO.findall(text)
    return _YESNO_CANON[found[-1].lower()] if found else None


# A letter right at the start of an answer segment: "B", "(B)", "option B.", "**C**", "b)".
_LEAD_LETTER = re.compile(
    r"""^[\s*_:(\[]*(?:(?i:option|choice)\s*)?[(\[]?
        (?: (?P<up>[A-D])(?![\w'’])          # capital letter: B, B., B), B:
          | (?P<low>[a-d])(?=[).:\]]|\s*$)   # lower-case only when clearly a label: b) / b.
        )""",
    re.VERBOSE,
)
_LETTER_HINTS = [
    re.compile(r"\(([A-D])\)"),  # (B)
    re.compile(r"\b(?:option|choice)\s*\(?([A-Da-d])\b", re.I),  # option B
    re.compile(r"(?:^|\n)[\s*_]*\(?([A-D])\)?[\s*_.)]*$"),  # a bare letter closing the text
]


def _lead_letter(segment: str) -> str | None:
    m = _LEAD_LETTER.match(segment)
    return (m.group("up") or m.group("low")).upper() if m else None


def _extract_choice(text: str, mode: str, options: Sequence[str] | None) -> str | None:
    text = _clean(text)
    bare = re.fullmatch(r"[\s*_(\[]*([A-Da-d])[\s*_.)\]]*", text)
    if bare:
        return bare[1].upper()
    for _, segment in reversed(_marker_spans(text, _CHOICE_MARKERS)):
        letter = _lead_letter(segment)
        if letter:
            return letter
    if mode == "strict":
        return None
    best: tuple[int, str] | None = None
    for rx in _LETTER_HINTS:
        for m in rx.finditer(text):
            if best is None or m.start(1) > best[0]:
                best = (m.start(1), m[1].upper())
    if best:
        return best[1]
    if options:
        return _option_text(text, options)
    return None


def _option_text(text: str, options: Sequence[str]) -> str | None:
    """The letter of the one option whose text appears in the reply (None if none or several)."""
    low = " ".join(text.lower().split())
    hits = {
        LETTERS[i]
        for i, opt in enumerate(options[: len(LETTERS)])
        if (o := " ".join(opt.lower().split()).rstrip(".")) and len(o) >= 3 and o in low
    }
    return hits.pop() if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------
# public API


def extract_answer(
    text: str,
    task: str,
    *,
    mode: str = "flexible",
    options: Sequence[str] | None = None,
    question: str | None = None,
) -> str | None:
    """The final answer a model gave, in canonical form ("18", "0.75", "yes", "B"), or None.

    ``options`` (choice tasks, flexible mode) lets a reply that quotes exactly one option's text
    without its letter count as that option. ``question`` (numeric, flexible mode) lets the
    final-statement rule prefer the number of the unit a "how many X" question asks for.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not text:
        return None
    if task == "numeric":
        return _extract_numeric(text, mode, question)
    if task == "yesno":
        return _extract_yesno(text, mode)
    if task == "choice":
        return _extract_choice(text, mode, options)
    raise ValueError(f"task must be one of {TASKS}, not {task!r}")


def normalize_gold(gold: str | bool | int | float, task: str) -> str:
    """A dataset's gold answer in canonical form; ValueError when it is not a valid one."""
    if task == "numeric":
        if isinstance(gold, bool):
            raise ValueError(f"not a number: {gold!r}")
        if isinstance(gold, int | float):
            return format_number(gold)
        gold = str(gold).rsplit("####", 1)[-1]  # a GSM8K-style worked solution: "... #### 18"
        parsed = _parse(gold)
        if parsed is None:
            raise ValueError(f"not a number: {gold!r}")
        return format_number(parsed[0]) + ("%" if parsed[1] else "")
    if task == "yesno":
        if isinstance(gold, bool):
            return "yes" if gold else "no"
        word = str(gold).strip().strip(".").lower()
        if word not in _YESNO_CANON:
            raise ValueError(f"not yes/no/true/false: {gold!r}")
        return _YESNO_CANON[word]
    if task == "choice":
        if isinstance(gold, int) and not isinstance(gold, bool):
            if not 0 <= gold < len(LETTERS):
                raise ValueError(f"option index out of range 0-{len(LETTERS) - 1}: {gold!r}")
            return LETTERS[gold]
        letter = str(gold).strip().strip("().").upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise ValueError(f"not an option letter A-D: {gold!r}")
        return letter
    raise ValueError(f"task must be one of {TASKS}, not {task!r}")


def is_correct(pred: str | None, gold: str, task: str) -> bool:
    """Does the extracted answer match the gold? Numbers compare by value; None is never right."""
    if pred is None:
        return False
    if task == "numeric":
        p, g = _parse(pred), _parse(gold)
        return p is not None and g is not None and _numbers_match(p, g)
    if task in ("yesno", "choice"):
        try:
            return normalize_gold(pred, task) == normalize_gold(gold, task)
        except ValueError:
            return False
    raise ValueError(f"task must be one of {TASKS}, not {task!r}")


def states_answer(text: str, gold: str, task: str) -> bool:
    """Does the text state the gold anywhere (any number equal to it; the yes/no word; the
    letter)? A rationale that never does cannot have reached it."""
    if task == "numeric":
        return any(is_correct(_render(m), gold, task) for m in _NUMBER.finditer(_clean(text or "")))
    if task == "yesno":
        return any(_YESNO_CANON[w.lower()] == gold for w in _YESNO.findall(text or ""))
    return re.search(rf"\b{re.escape(gold)}\b", text or "") is not None


def grade(
    text: str,
    gold: str,
    task: str,
    *,
    mode: str = "flexible",
    options: Sequence[str] | None = None,
    question: str | None = None,
) -> tuple[str | None, bool]:
    """(extracted answer, is it correct) for one model reply; the gold is only compared, never
    used to find the answer."""
    pred = extract_answer(text, task, mode=mode, options=options, question=question)
    return pred, is_correct(pred, gold, task)
