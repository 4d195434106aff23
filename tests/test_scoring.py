"""Review scores, the threshold rule, early stopping; parity with the FAIR paper's released data."""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter

import pytest

from fairdistill.engine.fair.scoring import aggregate, decided, parse_score, verdict
from tests.conftest import missing_data

# --------------------------------------------------------------------------------------------- parse_score


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("The reasoning is correct and clear.\n[4]", 4),
        ("[5]", 5),
        ("Score: [ 3 ]", 3),
        ("I'd give it [4/5].", 4),
        ("[2 / 5]", 2),
        ("**[5]**", 5),
        ("Step [1] is fine, step [2] is wrong. Overall: [2]", 2),  # the last bracket
        ("First I thought [5], but on reflection [3]", 3),
        ("[0]", None),  # out of range
        ("[6]", None),
        ("[83]", None),
        ("[-1]", None),
        ("[4] ... final: [0]", None),  # the last bracket decides; no earlier one guessed
        ("Score: 4", None),  # not bracketed
        ("4/5", None),
        ("[4.5]", None),  # not an integer
        ("[8/10]", None),  # another scale: not guessed
        ("[four]", None),
        ("", None),
        ("(4)", None),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


# ------------------------------------------------------------------------------------ aggregate, verdict


def test_aggregate():
    assert aggregate([3, 4, 5]) == 4.0
    assert aggregate([1, 5], "mean") == 3.0
    assert aggregate([1, 2, 5, 5], "median") == 3.5
    assert aggregate([4, 2, 5], "min") == 2.0
    assert aggregate([]) is None
    with pytest.raises(ValueError, match="aggregation"):
        aggregate([3], "max")


@pytest.mark.parametrize(
    ("scores", "kwargs", "expected"),
    [
        ([4, 3], {}, True),  # 3.5 > 3
        ([3, 3], {}, False),  # strictly greater
        ([5, 1], {}, False),  # 3.0
        ([5, None], {}, True),  # invalid dropped
        ([5, 0], {}, True),  # out of range dropped (the release's [5, 0])
        ([83, 5], {}, True),
        ([None, None], {}, None),  # nothing valid: no verdict
        ([], {}, None),
        ([4], {"min_valid": 2}, None),
        ([4, 5], {"min_valid": 2}, True),
        ([4, 4], {"threshold": 4.0}, False),
        ([5, 2], {"aggregation": "min"}, False),
        ([5, 4, 1], {"aggregation": "median"}, True),
        ([4], {"min_valid": 0}, True),
        ([None], {"min_valid": 0}, None),  # at least one valid score, whatever min_valid says
    ],
)
def test_verdict(scores, kwargs, expected):
    assert verdict(scores, **kwargs) is expected


# --------------------------------------------------------------------------------------------- decided

OUTCOMES = (None, 1, 2, 3, 4, 5)  # what one review can end up as (None = invalid or failed)
RULES = [
    {"threshold": t, "min_valid": m, "aggregation": a}
    for t in (2.5, 3.0, 3.5)  # below, at and above the paper's 3
    for m in (1, 2, 3)  # min_valid 0 behaves as 1
    for a in ("mean", "median", "min")
]


def _completions(received, pending):
    for rest in itertools.product(OUTCOMES, repeat=pending):
        yield list(received) + list(rest)


@pytest.mark.parametrize(
    "rule", RULES, ids=lambda r: f"{r['aggregation']}-t{r['threshold']}-m{r['min_valid']}"
)
def test_decided_is_sound_and_complete(rule):
    """Exhaustively: a verdict from `decided` is the verdict of every completion (sound), and
    whenever every completion agrees on accept or reject, `decided` says so (complete)."""
    checked = 0
    for n_received in range(4):
        for received in itertools.product(OUTCOMES, repeat=n_received):
            for pending in range(4):
                got = decided(list(received), pending, **rule)
                finals = {verdict(c, **rule) for c in _completions(received, pending)}
                if got is not None:
                    assert finals == {got}, (received, pending, got, finals)
                else:
                    assert finals != {True} and finals != {False}, (received, pending, finals)
                checked += 1
    assert checked == sum(6**n for n in range(4)) * 4


def test_decided_examples():
    # two reviewers, the paper's rule (mean of valid > 3)
    assert decided([], 2) is None
    assert decided([5], 1) is None  # a 1 makes it 3.0 (reject); an invalid keeps 5 (accept)
    assert decided([1], 1) is False  # best case (1 + 5) / 2 = 3.0: never above 3
    assert decided([2], 1) is None  # (2 + 5) / 2 = 3.5 could still accept
    assert decided([None], 1) is None
    assert decided([4, 4], 0) is True
    assert decided([4, None], 0) is True
    assert decided([None, None], 0) is None  # no verdict at all
    assert decided([5, 5], 1) is True  # (5 + 5 + 1) / 3 > 3
    assert decided([1, 1], 1) is False
    # min_valid out of reach: surely no verdict, reported as undecided
    assert decided([], 1, min_valid=3) is None


def test_decided_rejects_negative_pending():
    with pytest.raises(ValueError):
        decided([], -1)


# --------------------------------------------------------------------------------------------- FAIR parity

TEACHERS = ("gpt_rationale", "gemini_rationale", "mistral_rationale")


def test_fair_release_parity(datasets_dir):
    """The paper's rule on its released SVAMP rationales reproduces its accepted set exactly."""
    path = datasets_dir / "fair-release" / "Llama-2-7b-chat-hf_svamp_rationale_round0.json"
    if not path.is_file():
        missing_data(f"{path} absent")
    rows = json.loads(path.read_text())
    assert len(rows) == 387
    total = accepted = 0
    for row in rows:
        kept = []
        for teacher in TEACHERS:  # the release lists accepted texts in this order
            text, *scores = row[teacher]
            assert len(scores) == 2
            total += 1
            if verdict(scores, threshold=3.0, min_valid=1, aggregation="mean"):
                kept.append(text)
        accepted += len(kept)
        assert Counter(kept) == Counter(row["correct_rationale"]), row["id"]
        assert kept == row["correct_rationale"], row["id"]  # same order too
        # early stopping never changes a verdict: score one review at a time as the engine does
        for teacher in TEACHERS:
            _, *scores = row[teacher]
            final = verdict(scores)
            for i in range(len(scores) + 1):
                early = decided(scores[:i], len(scores) - i)
                assert early is None or early == final
    print(
        f"\nFAIR SVAMP release: {accepted} of {total} rationales accepted; correct_rationale matches for all"
    )
    assert (accepted, total) == (826, 1161)


def test_calibrated_aggregation_on_the_fair_release(datasets_dir):
    """Calibrated vs the paper's rule on the released SVAMP reviews: how many verdicts change,
    and whether the accepted set states the gold more often. Reported (``-s``) either way."""
    from fairdistill.engine.fair.answers import normalize_gold, states_answer
    from fairdistill.engine.fair.scoring import calibrated_verdicts
    from fairdistill.engine.sim.replay import REVIEWERS

    path = datasets_dir / "fair-release" / "Llama-2-7b-chat-hf_svamp_rationale_round0.json"
    if not path.is_file():
        missing_data(f"{path} absent")
    items, texts = [], []
    for row in json.loads(path.read_text()):
        gold = normalize_gold(row["gold_answer"], "numeric")
        for teacher in TEACHERS:
            text, *scores = row[teacher]
            author = teacher.removesuffix("_rationale")
            items.append(list(zip(REVIEWERS[author], scores, strict=True)))
            texts.append(states_answer(text, gold, "numeric"))
    paper = [verdict([s for _, s in item]) for item in items]
    cal = calibrated_verdicts(items)
    changed = sum(a != b for a, b in zip(paper, cal, strict=True))

    def stating(verdicts):
        kept = [t for v, t in zip(verdicts, texts, strict=True) if v]
        return len(kept), sum(kept) / len(kept)

    (n_paper, share_paper), (n_cal, share_cal) = stating(paper), stating(cal)
    means = {r: statistics.fmean(s for item in items for rr, s in item if rr == r and 1 <= s <= 5)
             for r in ("gpt", "gemini", "mistral")}  # fmt: skip
    print(
        f"\nFAIR SVAMP release, reviewer means {', '.join(f'{r} {m:.2f}' for r, m in means.items())}"
        f"\n  paper rule: {n_paper} accepted, {share_paper:.1%} state the gold"
        f"\n  calibrated: {n_cal} accepted, {share_cal:.1%} state the gold; {changed} of {len(items)} "
        "verdicts changed"
    )
    assert n_paper == 826 and len(items) == 1161
    assert changed > 0  # the reviewers' leniency differs, so standardising moves some verdicts


def test_calibrated_verdicts_offline_are_order_free_live_ones_are_not():
    """``calibrated_verdicts`` standardises against the whole run, so the order of the items does
    not matter; the live rule (a running ``Calibration``) judges each item against the scores
    received before it, so the same item can get another verdict in another order (README)."""
    import random

    from fairdistill.engine.fair.scoring import Calibration, calibrated_verdict, calibrated_verdicts

    rng = random.Random(0)
    items = [[("lenient", rng.choice((4, 5))), ("harsh", rng.choice((2, 3, 4)))] for _ in range(60)]
    base = calibrated_verdicts(items)
    assert len(set(base)) == 2  # both verdicts occur, or order could not matter anyway
    for seed in range(5):
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        shuffled = calibrated_verdicts([items[i] for i in order])
        assert [shuffled[order.index(i)] for i in range(len(items))] == base

    def live(seq):
        cal, out = Calibration(), []
        for item in seq:
            for reviewer, score in item:
                cal.add(reviewer, score)
            out.append(calibrated_verdict(item, cal)[0])
        return out

    probe = [("lenient", 2), ("harsh", 4)]  # judged after 20 items of one history or another
    mild_history = [[("lenient", 5), ("harsh", 4)]] * 20 + [probe]
    harsh_history = [[("lenient", 5), ("harsh", 2)]] * 20 + [probe]
    assert live(mild_history)[-1] is True and live(harsh_history)[-1] is False
