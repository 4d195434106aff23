"""Figures of a run directory, for `fair status` and `report.md`.

Everything is computed from the records and the trace, so the same numbers come out whether the
run is live, finished or resumed, and whichever writers produced the shards.
"""

from __future__ import annotations

import collections
import statistics
import tomllib
from pathlib import Path
from typing import Any

from fairdistill.engine.errors import DamagedRunError, UsageError
from fairdistill.engine.fair.errortypes import TYPES, UNKNOWN, majority
from fairdistill.engine.fair.splits import find_training_record
from fairdistill.engine.rundir.store import iter_raw, read_manifest, shard_paths
from fairdistill.engine.rundir.tracesum import TraceTotals, read_totals


def summarize(run_dir: str | Path, digests: dict[str, str] | None = None) -> dict[str, Any]:
    """The figures of a run directory (``fair status``, ``report.md``): counts per stage, per
    teacher and reviewer, judge quality, error types, failures, calls, tokens and dollars.
    ``digests``: shard sha256s computed already (``engine.rundir.verify.first_damage``)."""
    root = Path(run_dir)
    manifest = read_manifest(root) or {}
    problems = collections.Counter(r["status"] for r in iter_raw(root, "problems"))
    done_ids = {r["id"] for r in iter_raw(root, "problems")}

    attempts = list(iter_raw(root, "attempts"))
    correct = sum(a["correct"] for a in attempts)

    rationale_status, teachers = _rationales(root)
    n_reviews, reviewers = _reviews(root)

    judges = judge_quality(root)
    samples = collections.Counter(s["task"] for s in iter_raw(root, "samples"))
    authored = collections.Counter(s["teacher"] for s in iter_raw(root, "samples"))
    failures = [f for f in iter_raw(root, "failures") if f["problem_id"] not in done_ids]

    trace = _trace_figures(root, digests)
    calls, cost, tokens, spent, billed = trace.calls, trace.cost, trace.tokens, trace.spent, trace.billed

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
        "teachers": teachers,
        "reviewers": reviewers,
        "judges": judges,
        "error_types": error_types(root),
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
        "tokens_by_endpoint": {name: dict(b) for name, b in sorted(billed.items())},  # as billed
        "keys": trace.by_key,  # endpoints with a key pool: per key variable (tracesum.TraceTotals)
        "teacher_calls_per_mistake": teacher_calls / mistakes if mistakes else None,
        "latency_p50_s": trace.latency_p50(),  # to 3 significant digits
        "cost_per_sample": _cost_per_sample(spent, authored),
    }


def _rationales(root: Path) -> tuple[collections.Counter, dict[str, Any]]:
    """Rationales by status, and per teacher: how many, accepted, matching the gold answer."""
    per_teacher: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    status: collections.Counter = collections.Counter()
    for r in iter_raw(root, "rationales"):
        status[r["status"]] += 1
        t = per_teacher[r["teacher"]]
        t["total"] += 1
        t[r["status"]] += 1
        t["gold_match"] += bool(r.get("gold_match"))
    teachers = {
        name: {
            "rationales": c["total"],
            "accepted": c["accepted"],
            "acceptance_rate": c["accepted"] / c["total"] if c["total"] else None,
            "gold_match_rate": c["gold_match"] / c["total"] if c["total"] else None,
            "rejected_gold": c["rejected_gold"],
            "rejected_review": c["rejected_review"],
        }
        for name, c in sorted(per_teacher.items())
    }
    return status, teachers


def _reviews(root: Path) -> tuple[int, dict[str, Any]]:
    """How many reviews, and per reviewer: reviews, mean valid score, pass rate, invalid ones."""
    per_reviewer: dict[str, list[int]] = collections.defaultdict(list)
    invalid: collections.Counter = collections.Counter()
    n_reviews = 0
    for rv in iter_raw(root, "reviews"):
        n_reviews += 1
        if rv["score"] is None:
            invalid[rv["reviewer"]] += 1
        else:
            per_reviewer[rv["reviewer"]].append(rv["score"])
    reviewers = {
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
    }
    return n_reviews, reviewers


def _trace_figures(root: Path, digests: dict[str, str] | None) -> TraceTotals:
    """The trace's call counts, dollars, tokens, latencies, dollars per endpoint and stage, and
    tokens as billed per endpoint: saved totals of sealed shards, other shards read line by line."""
    read_manifest(root)  # a newer schema is refused before the trace is read
    return read_totals(root, shard_paths(root, "trace"), digests)


def _cost_per_sample(spent: dict[str, collections.Counter], authored: collections.Counter) -> dict[str, Any]:
    """Dollars per accepted sample: per endpoint (all its calls, reviews of others included, over
    the samples it authored) and per stage (the stage's calls over all samples)."""
    total = sum(authored.values())
    stages: collections.Counter = collections.Counter()
    for by_stage in spent.values():
        stages.update(by_stage)

    def per(usd: float, n: int) -> float | None:
        return usd / n if n else None

    return {
        "samples": total,
        "endpoints": {
            name: {
                "usd": sum(s.values()),
                "by_stage": dict(s),
                "samples": authored[name],
                "usd_per_sample": per(sum(s.values()), authored[name]),
            }
            for name, s in sorted(spent.items())
        },
        "stages": {
            name: {"usd": usd, "usd_per_sample": per(usd, total)} for name, usd in sorted(stages.items())
        },
    }


def _tokens_markdown(endpoints: dict[str, Any]) -> list[str]:
    if not endpoints:
        return []
    lines = [
        "",
        "## Tokens by endpoint (as billed)",
        "",
        "Thinking tokens are part of the output tokens and billed as output; cached input tokens are "
        "part of the input tokens and priced at `price_cached_in`.",
        "",
        "| endpoint | input | cached input | cache writes | output | thinking | dollars |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in endpoints.items():
        lines.append(
            f"| {name} | {b.get('prompt_tokens', 0):,} | {b.get('cached_tokens', 0):,} | "
            f"{b.get('cache_write_tokens', 0):,} | {b.get('completion_tokens', 0):,} | "
            f"{b.get('reasoning_tokens', 0):,} | ${b.get('cost_usd', 0.0):.4f} |"
        )
    return lines


def _keys_markdown(endpoints: dict[str, Any]) -> list[str]:
    """Per key of a pool (by its variable's name, never the key): calls, 429s, cached share, retired."""
    if not endpoints:
        return []
    lines = [
        "",
        "## Keys (endpoints with a key pool)",
        "",
        "Calls served by each key, the 429s they met, the share of their input tokens read from the "
        "provider's cache (per organisation), and whether a 401/403 retired the key for the run.",
        "",
        "| endpoint | key | calls | 429s | input | cached input | cached share | dollars | retired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, keys in endpoints.items():
        for env, k in keys.items():
            lines.append(
                f"| {name} | {env} | {k['calls']} | {k['http_429']} | {k['prompt_tokens']:,} | "
                f"{k['cached_tokens']:,} | {_pct(k['cached_share'])} | ${k['cost_usd']:.4f} | "
                f"{'yes' if k['retired'] else 'no'} |"
            )
    return lines


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
    lines += _tokens_markdown(s.get("tokens_by_endpoint") or {})
    lines += _keys_markdown(s.get("keys") or {})
    lines += _cost_markdown(s.get("cost_per_sample") or {})
    lines += _judges_markdown(s.get("judges") or {})
    lines += _error_types_markdown(s.get("error_types") or {})
    if s["failures"]:
        lines += ["", "## Failures", ""]
        lines += [f"- `{f['problem_id']}` at {f['stage']}: {f['reason']}" for f in s["failures"][:50]]
    return "\n".join(lines) + "\n"


def _cost_markdown(c: dict[str, Any]) -> list[str]:
    if not c.get("endpoints"):
        return []
    stages = list(c["stages"])
    lines = [
        "",
        "## Dollars per accepted sample",
        "",
        f"{c['samples']} accepted samples. Per endpoint: its calls' dollars by stage, over the samples "
        "it authored (a teacher's reviews of others count against it); last row: each stage over all "
        "samples.",
        "",
        "| endpoint | " + " | ".join(f"$ {x}" for x in stages) + " | $ total | samples | $ / sample |",
        "|---|" + "---|" * (len(stages) + 3),
    ]
    for name, e in c["endpoints"].items():
        cells = " | ".join(f"{e['by_stage'].get(x, 0.0):.4f}" for x in stages)
        lines.append(
            f"| {name} | {cells} | {e['usd']:.4f} | {e['samples']} | {_num(e['usd_per_sample'], '.5f')} |"
        )
    per_stage = " | ".join(_num(c["stages"][x]["usd_per_sample"], ".5f") for x in stages)
    total = sum(v["usd"] for v in c["stages"].values())
    lines.append(
        f"| per sample | {per_stage} | {_num(total / c['samples'] if c['samples'] else None, '.5f')} | "
        f"{c['samples']} | |"
    )
    return lines


def write_report(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "report.md"
    path.write_text(render_markdown(summarize(run_dir)))
    return path


# -- judge quality ------------------------------------------------------------------------------


def _ranks(xs: list[float]) -> list[float]:
    """Ranks 1..n, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho (Pearson on average ranks); None below 3 pairs or with a constant side."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else None


def judge_quality(root: Path, threshold: float = 3.0) -> dict[str, Any]:
    """Per reviewer of rationales: leniency, agreement with the others, false accepts; and the
    committee's accepted rationales that never state the gold."""
    rationales = {r["id"]: r for r in iter_raw(root, "rationales")}
    by_target: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for rv in iter_raw(root, "reviews"):
        if rv["target_id"] in rationales and rv["score"] is not None:
            by_target[rv["target_id"]][rv["reviewer"]] = rv["score"]
    reviewers = sorted({name for scores in by_target.values() for name in scores})
    out: dict[str, Any] = {"reviewers": {}}
    for name in reviewers:
        mine = [(t, sc[name]) for t, sc in by_target.items() if name in sc]
        values = [v for _, v in mine]
        rhos = []
        for other in reviewers:
            pairs = [(sc[name], sc[other]) for sc in by_target.values() if name in sc and other in sc]
            if other != name and (rho := spearman([p[0] for p in pairs], [p[1] for p in pairs])) is not None:
                rhos.append((rho, len(pairs)))
        votes = [rationales[t].get("gold_match") for t, v in mine if v > threshold]
        known = [g for g in votes if g is not None]
        out["reviewers"][name] = {
            "scores": len(values),
            "mean_score": statistics.fmean(values) if values else None,
            "accept_share": sum(v > threshold for v in values) / len(values) if values else None,
            "spearman_vs_others": (sum(r * n for r, n in rhos) / sum(n for _, n in rhos) if rhos else None),
            "false_accept_share": sum(g is False for g in known) / len(known) if known else None,
        }
    accepted = [r for r in rationales.values() if r.get("accepted")]
    stated = [r.get("gold_stated") for r in accepted if r.get("gold_stated") is not None]
    matched = [r.get("gold_match") for r in accepted if r.get("gold_match") is not None]
    out["accepted"] = len(accepted)
    out["accepted_never_stating_gold"] = sum(s is False for s in stated) / len(stated) if stated else None
    out["accepted_wrong_final_answer"] = sum(m is False for m in matched) / len(matched) if matched else None
    return out


def _judges_markdown(j: dict[str, Any]) -> list[str]:
    if not j.get("reviewers"):
        return []
    lines = [
        "",
        "## Judge quality (reviews of rationales)",
        "",
        "| reviewer | scores | mean score | share > 3 (accept votes) | Spearman ρ vs other reviewers "
        "| accept votes for a wrong final answer |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in j["reviewers"].items():
        lines.append(
            f"| {name} | {r['scores']} | {_num(r['mean_score'])} | {_pct(r['accept_share'])} | "
            f"{_num(r['spearman_vs_others'])} | {_pct(r['false_accept_share'])} |"
        )
    lines += [
        "",
        f"Accepted rationales that never state the gold answer: {_pct(j['accepted_never_stating_gold'])}; "
        f"whose final answer is not the gold: {_pct(j['accepted_wrong_final_answer'])} "
        f"(of {j['accepted']} accepted).",
    ]
    return lines


# -- error types --------------------------------------------------------------------------------


def error_types(root: Path, *, previous: bool = True) -> dict[str, Any]:
    """Each teacher's tags, and per mistake the majority tag (``engine.fair.errortypes``); for a round-2
    run (``student.adapter`` in its config.toml), the same for the runs the adapter was trained on
    (``previous``: the training record ``fair train`` keeps), so the report shows how it moved."""
    per_teacher: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_attempt: dict[str, list[str]] = collections.defaultdict(list)
    for f in iter_raw(root, "feedback"):
        tag = f.get("error_type") or UNKNOWN
        per_teacher[f["teacher"]][tag] += 1
        per_attempt[f["attempt_id"]].append(tag)
    mistakes = collections.Counter(majority(tags) for tags in per_attempt.values())
    split = sum(len(set(tags)) > 1 for tags in per_attempt.values())
    out: dict[str, Any] = {
        "mistakes": dict(mistakes),
        "teachers": {k: dict(v) for k, v in sorted(per_teacher.items())},
        "teachers_disagree": split,
        "n": len(per_attempt),
    }
    if previous and (runs := _previous_rounds(root)):
        out["previous"] = {}
        for d in runs:
            try:
                out["previous"][str(d)] = error_types(d, previous=False)
            except DamagedRunError:  # a damaged earlier round is left out, not this run's report
                continue
    return out


def _previous_rounds(root: Path) -> list[Path]:
    """The run directories a round-2 run's adapter was trained on (those still on disk)."""
    try:
        cfg = tomllib.loads((root / "config.toml").read_text())
    except (OSError, ValueError):
        return []
    adapter = (cfg.get("student") or {}).get("adapter")
    try:
        record = find_training_record(adapter) if isinstance(adapter, str) else None
    except UsageError:  # a damaged record: the report goes without the earlier rounds
        return []
    if not record:
        return []
    dirs = [Path(r["run_dir"]) for r in record.get("runs", ()) if isinstance(r, dict) and r.get("run_dir")]
    return [d for d in dirs if (d / "feedback").exists() and d.resolve() != root.resolve()]


def _count_share(k: int, n: int) -> str:
    return f"{k} ({_pct(k / n)})" if n else "0"


def _error_types_markdown(e: dict[str, Any]) -> list[str]:
    if not e.get("n"):
        return []
    n = e["n"]
    before = e.get("previous") or {}
    head = "| error type | mistakes | share |"
    if before:  # round 2: the rounds its adapter was trained on, then this one
        head = (
            "| error type | "
            + " | ".join(f"before: {Path(d).name} (n = {b['n']})" for d, b in before.items())
            + f" | this run (n = {n}) |"
        )
    lines = [
        "",
        "## Student error types (majority of the teachers' tags)",
        "",
        head,
        "|---" * (head.count("|") - 1) + "|",
    ]
    for tag in (*TYPES, UNKNOWN):
        k = e["mistakes"].get(tag, 0)
        if before:
            cells = [_count_share(b["mistakes"].get(tag, 0), b["n"]) for b in before.values()]
            lines.append(f"| {tag} | " + " | ".join(cells) + f" | {_count_share(k, n)} |")
        else:
            lines.append(f"| {tag} | {k} | {_pct(k / n)} |")
    if before:
        lines += ["", "Before: the runs the student's adapter was trained on (its `fair_training.json`)."]
    lines += ["", f"Teachers disagree on {e['teachers_disagree']} of {n} mistakes; per teacher:", ""]
    for teacher, tags in e["teachers"].items():
        lines.append(f"- {teacher}: " + ", ".join(f"{t} {c}" for t, c in sorted(tags.items())))
    return lines
