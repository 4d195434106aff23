"""Figures of a run directory, for `fair status` and `report.md`.

Everything is computed from the records and the trace, so the same numbers come out whether the
run is live, finished or resumed, and whichever writers produced the shards.
"""

from __future__ import annotations

import collections
import statistics
from pathlib import Path
from typing import Any

from engine.store import iter_raw, read_manifest


def summarize(run_dir: str | Path) -> dict[str, Any]:
    root = Path(run_dir)
    manifest = read_manifest(root) or {}
    problems = collections.Counter(r["status"] for r in iter_raw(root, "problems"))
    done_ids = {r["id"] for r in iter_raw(root, "problems")}

    attempts = list(iter_raw(root, "attempts"))
    correct = sum(a["correct"] for a in attempts)

    per_teacher: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rationale_status: collections.Counter = collections.Counter()
    for r in iter_raw(root, "rationales"):
        rationale_status[r["status"]] += 1
        t = per_teacher[r["teacher"]]
        t["total"] += 1
        t[r["status"]] += 1
        t["gold_match"] += bool(r.get("gold_match"))

    per_reviewer: dict[str, list[int]] = collections.defaultdict(list)
    invalid: collections.Counter = collections.Counter()
    n_reviews = 0
    for rv in iter_raw(root, "reviews"):
        n_reviews += 1
        if rv["score"] is None:
            invalid[rv["reviewer"]] += 1
        else:
            per_reviewer[rv["reviewer"]].append(rv["score"])

    samples = collections.Counter(s["task"] for s in iter_raw(root, "samples"))
    failures = [f for f in iter_raw(root, "failures") if f["problem_id"] not in done_ids]

    calls = collections.Counter()
    cost = 0.0
    tokens = 0
    latency: list[float] = []
    for t in iter_raw(root, "trace"):
        if t.get("cache_hit"):
            calls["cache_hits"] += 1
            continue
        calls["calls"] += 1
        calls["http_429"] += t.get("http_429", 0)
        calls["retries"] += max(0, t.get("attempts", 1) - 1)
        cost += t.get("cost_usd", 0.0)
        tokens += t.get("prompt_tokens", 0) + t.get("completion_tokens", 0)
        if t.get("latency_s") is not None:
            latency.append(t["latency_s"])

    # distinct wrong answers per problem, as the student stage counts them (stages.student.mistakes)
    mistakes = len({(a["problem_id"], a["text"].strip()) for a in attempts if not a["correct"]})
    judged = sum(rationale_status.values())
    teacher_calls = calls["calls"] - len(attempts) if calls["calls"] else 0
    return {
        "status": manifest.get("status", "running"),
        "problems_total": manifest.get("problems_total"),
        "problems": dict(problems),
        "problems_done": sum(problems.values()),
        "attempts": len(attempts),
        "student_accuracy": correct / len(attempts) if attempts else None,
        "mistakes": mistakes,
        "rationales": dict(rationale_status),
        "acceptance_rate": rationale_status["accepted"] / judged if judged else None,
        "teachers": {
            name: {
                "rationales": c["total"],
                "accepted": c["accepted"],
                "acceptance_rate": c["accepted"] / c["total"] if c["total"] else None,
                "gold_match_rate": c["gold_match"] / c["total"] if c["total"] else None,
                "rejected_gold": c["rejected_gold"],
                "rejected_review": c["rejected_review"],
            }
            for name, c in sorted(per_teacher.items())
        },
        "reviewers": {
            name: {
                "reviews": len(per_reviewer[name]) + invalid[name],
                "mean_score": statistics.fmean(per_reviewer[name]) if per_reviewer[name] else None,
                "pass_rate": (
                    sum(x > 3 for x in per_reviewer[name]) / len(per_reviewer[name])
                    if per_reviewer[name]
                    else None
                ),
                "invalid": invalid[name],
            }
            for name in sorted(set(per_reviewer) | set(invalid))
        },
        "reviews": n_reviews,
        "feedback": sum(1 for _ in iter_raw(root, "feedback")),
        "samples": dict(samples),
        "failures": [
            {"problem_id": f["problem_id"], "stage": f["stage"], "reason": f["reason"]} for f in failures
        ],
        "calls": calls["calls"],
        "cache_hits": calls["cache_hits"],
        "http_429": calls["http_429"],
        "retries": calls["retries"],
        "tokens": tokens,
        "cost_usd": cost,
        "teacher_calls_per_mistake": teacher_calls / mistakes if mistakes else None,
        "latency_p50_s": statistics.median(latency) if latency else None,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def render_markdown(s: dict[str, Any], title: str = "FAIR run report") -> str:
    lines = [f"# {title}", "", f"Status: **{s['status']}**", ""]
    lines += [
        "## Pipeline",
        "",
        "| figure | value |",
        "|---|---|",
        f"| problems done | {s['problems_done']} / {s['problems_total'] or '?'} |",
        f"| student attempts (accuracy) | {s['attempts']} ({_pct(s['student_accuracy'])}) |",
        f"| mistakes (distinct wrong answers) | {s['mistakes']} |",
        f"| rationales accepted | {s['rationales'].get('accepted', 0)} |",
        f"| rejected by gold check | {s['rationales'].get('rejected_gold', 0)} |",
        f"| rejected by review | {s['rationales'].get('rejected_review', 0)} |",
        f"| without enough valid reviews | {s['rationales'].get('no_reviews', 0)} |",
        f"| acceptance rate | {_pct(s['acceptance_rate'])} |",
        f"| mistake explanations | {s['feedback']} |",
        f"| reviews | {s['reviews']} |",
        f"| samples (rationale / mistake) | {s['samples'].get('rationale', 0)} / "
        f"{s['samples'].get('mistake', 0)} |",
        f"| API calls (cache hits) | {s['calls']} ({s['cache_hits']}) |",
        f"| teacher calls per mistake | {_num(s['teacher_calls_per_mistake'])} (paper: 12) |",
        f"| tokens | {s['tokens']:,} |",
        f"| cost | ${s['cost_usd']:.4f} |",
        f"| HTTP 429 / retries | {s['http_429']} / {s['retries']} |",
        f"| unfinished problems with failures | {len({f['problem_id'] for f in s['failures']})} |",
        "",
        "## Acceptance by teacher (author)",
        "",
        "| teacher | rationales | gold match | accepted | rejected (gold) | rejected (review) | acceptance |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in s["teachers"].items():
        lines.append(
            f"| {name} | {t['rationales']} | {_pct(t['gold_match_rate'])} | {t['accepted']} | "
            f"{t['rejected_gold']} | {t['rejected_review']} | {_pct(t['acceptance_rate'])} |"
        )
    lines += [
        "",
        "## Reviewers (leniency)",
        "",
        "| reviewer | reviews | mean score | share scored > 3 | unparseable |",
        "|---|---|---|---|---|",
    ]
    for name, r in s["reviewers"].items():
        lines.append(
            f"| {name} | {r['reviews']} | {_num(r['mean_score'])} | {_pct(r['pass_rate'])} | {r['invalid']} |"
        )
    if s["failures"]:
        lines += ["", "## Failures", ""]
        lines += [f"- `{f['problem_id']}` at {f['stage']}: {f['reason']}" for f in s["failures"][:50]]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "report.md"
    path.write_text(render_markdown(summarize(run_dir)))
    return path
