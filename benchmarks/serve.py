"""``fair bench serve``: the CPU student server under 16 concurrent requests vs one-at-a-time.

Same prompts, same ``max_tokens``, greedy on both sides, one loaded SmolLM2-135M-Instruct:

- **sequential** — ``model.generate`` on one prompt at a time (what a naive student loop does);
- **static** — ``model.generate`` on all 16 prompts as one left-padded batch (static batching);
- **server** — 16 concurrent chat requests over loopback HTTP to :class:`trainer.serve.StudentServer`
  (continuous batching).

Reports generated tokens/s of each and the server's ratio to both (targets: ≥ 4x sequential on
2 cores; vs static, all arriving at once, about 1x: nothing to gain), plus how many of the 16
greedy outputs are token-for-token identical to sequential (batching must not change the answer).

**Staggered arrivals**: the same 16 requests arriving one every ``gap`` seconds (``gap`` = one
request's sequential time / 8, so arrivals span two single-request latencies). A static batcher
takes what has arrived (up to 16), runs it to the end, then takes what arrived meanwhile; the
server lets new requests join at the next step. Tokens/s from the first arrival to the last
reply; target: the server ≥ 1.3x static. About 4 minutes; ``--quick`` about 2.
"""

from __future__ import annotations

import asyncio
import sys
import time

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A book costs $12. How much do 4 books cost?",
    "Sara had 20 stickers and gave away 7. How many are left?",
    "There are 6 rows of 8 chairs. How many chairs are there?",
    "A train travels 60 km per hour for 3 hours. How far does it go?",
    "Ben reads 15 pages a day. How many pages does he read in a week?",
    "A pizza is cut into 8 slices and 3 are eaten. How many slices remain?",
    "Anna is 9 years old and her brother is twice as old. How old is her brother?",
    "A farmer has 24 eggs and packs them in boxes of 6. How many boxes does he fill?",
    "Lily saves $5 each week. How much has she saved after 9 weeks?",
    "A class has 14 girls and 13 boys. How many students are in the class?",
    "A shirt costs $25 and is on sale for $7 off. What is the sale price?",
    "Max walks 2 km to school and back every day. How far does he walk in 5 days?",
    "There are 45 marbles shared equally among 5 children. How many does each get?",
    "A garden has 7 rows of 9 tulips. How many tulips are there?",
    "Jo had 100 dollars, spent 35 on food and 20 on books. How much is left?",
]
SYSTEM = "Solve the problem step by step, then give the final answer on the last line."


def _messages(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def sequential(model, tok, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    import torch

    outputs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            outputs.append(out[0, len(ids) :].tolist())
    return time.perf_counter() - t0, outputs


def static_batch(model, tok, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """One left-padded ``model.generate`` over all ``prompts``; ``(seconds, new tokens per row)``."""
    import torch

    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
        )
    seconds = time.perf_counter() - t0
    rows = []
    for row in out[:, width:].tolist():  # a row that stopped early is padded after its EOS
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        rows.append(row)
    return seconds, rows


def static_staggered(model, tok, prompts: list[list[int]], max_tokens: int, gap: float) -> tuple[float, int]:
    """Arrivals every ``gap`` s; each batch is what has arrived (<= 16), run to its end."""
    t0 = time.perf_counter()
    done, tokens = 0, 0
    while done < len(prompts):
        now = time.perf_counter() - t0
        arrived = min(len(prompts), int(now / gap) + 1)
        if arrived <= done:
            time.sleep(done * gap - now)
            continue
        _, rows = static_batch(model, tok, prompts[done:arrived], max_tokens)
        tokens += sum(len(r) for r in rows)
        done = arrived
    return time.perf_counter() - t0, tokens


async def staggered(
    base_url: str, model: str, questions: list[str], max_tokens: int, gap: float
) -> tuple[float, list]:
    """The questions over HTTP, one every ``gap`` seconds; ``(first arrival to last reply, replies)``."""
    import aiohttp

    async def one(session, i, q):
        await asyncio.sleep(i * gap)
        body = {"model": model, "messages": _messages(q), "max_tokens": max_tokens, "temperature": 0}
        async with session.post(f"{base_url}/chat/completions", json=body) as r:
            r.raise_for_status()
            return await r.json()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(questions))) as s:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(s, i, q) for i, q in enumerate(questions)))
        return time.perf_counter() - t0, replies


async def concurrent(
    base_url: str, model: str, questions: list[str], max_tokens: int
) -> tuple[float, list[dict]]:
    """All ``questions`` at once over HTTP; ``(wall seconds, replies)``."""
    import aiohttp

    async def one(session, q):
        body = {
            "model": model,
            "messages": _messages(q),
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
        }
        async with session.post(f"{base_url}/chat/completions", json=body) as r:
            r.raise_for_status()
            return await r.json()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(questions))) as s:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(s, q) for q in questions))
        return time.perf_counter() - t0, replies


def add_arguments(parser) -> None:
    parser.add_argument("--max-tokens", type=int, default=None, help="per request (default 64; --quick 24)")


def run(args) -> dict:
    from fairdistill.trainer.serve import StudentServer, passive_openmp

    passive_openmp()  # as `fair serve-student` does; applies to both sides of the comparison
    import torch

    from fairdistill.trainer.model import load_student

    quick = bool(getattr(args, "quick", False))
    max_tokens = getattr(args, "max_tokens", None) or (24 if quick else 64)
    torch.set_num_threads(2)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    model, tok = load_student(device="cpu")
    model.eval()
    log(
        f"bench serve: model loaded in {time.perf_counter() - t0:.1f}s; {len(QUESTIONS)} prompts, "
        f"max_tokens={max_tokens}, greedy"
    )
    prompts = [
        tok(
            tok.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in QUESTIONS
    ]

    # the sequential half-runs straddle the server run, so a load change on the shared box hits both
    half = len(prompts) // 2
    sequential(model, tok, prompts[:1], 2)  # warm-up
    seq_first_s, seq_first = sequential(model, tok, prompts[:half], max_tokens)
    static_s, static_rows = static_batch(model, tok, prompts, max_tokens)
    static_tokens = sum(len(r) for r in static_rows)
    log(f"bench serve: static batch of {len(prompts)}: {static_tokens} tokens in {static_s:.1f}s")
    gap = seq_first_s / half / 8  # arrivals span two single-request latencies
    with StudentServer(model=model, tokenizer=tok, max_batch=16, served_model_name="student") as srv:
        asyncio.run(concurrent(srv.base_url, "student", ["What is 1 + 1?"], 4))  # warm-up
        before = srv.stats
        server_s, replies = asyncio.run(concurrent(srv.base_url, "student", QUESTIONS, max_tokens))
        after = srv.stats
        log(f"bench serve: staggered arrivals every {gap:.2f}s...")
        stag_server_s, stag_replies = asyncio.run(
            staggered(srv.base_url, "student", QUESTIONS, max_tokens, gap)
        )
    stag_static_s, stag_static_tokens = static_staggered(model, tok, prompts, max_tokens, gap)
    stag_server_tokens = sum(r["usage"]["completion_tokens"] for r in stag_replies)
    steps = after["steps"] - before["steps"]
    mean_batch = (after["row_steps"] - before["row_steps"]) / steps if steps else 0.0
    server_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    log(f"bench serve: server  {server_tokens} tokens in {server_s:.1f}s")
    seq_second_s, seq_second = sequential(model, tok, prompts[half:], max_tokens)

    seq_s, seq_out = seq_first_s + seq_second_s, seq_first + seq_second
    seq_tokens = sum(len(o) for o in seq_out)
    log(f"bench serve: sequential {seq_tokens} tokens in {seq_s:.1f}s")

    identical = sum(r["choices"][0]["token_ids"] == o for r, o in zip(replies, seq_out, strict=True))
    seq_rate, server_rate = seq_tokens / seq_s, server_tokens / server_s
    result = {
        "benchmark": "serve",
        "quick": quick,
        "requests": len(QUESTIONS),
        "max_tokens": max_tokens,
        "threads": torch.get_num_threads(),
        "sequential_tokens": seq_tokens,
        "sequential_s": round(seq_s, 2),
        "sequential_tokens_per_s": round(seq_rate, 1),
        "server_tokens": server_tokens,
        "server_s": round(server_s, 2),
        "server_tokens_per_s": round(server_rate, 1),
        "ratio": round(server_rate / seq_rate, 2),
        "identical_outputs": identical,
        "server_max_batch": after["max_batch_seen"],
        "server_mean_batch": round(mean_batch, 2),
        "target_ratio": 4.0,
        "static_tokens": static_tokens,
        "static_s": round(static_s, 2),
        "static_tokens_per_s": round(static_tokens / static_s, 1),
        "ratio_vs_static": round(server_rate / (static_tokens / static_s), 2),
        "staggered_gap_s": round(gap, 3),
        "staggered_static_tokens_per_s": round(stag_static_tokens / stag_static_s, 1),
        "staggered_server_tokens_per_s": round(stag_server_tokens / stag_server_s, 1),
        "staggered_ratio_vs_static": round(
            (stag_server_tokens / stag_server_s) / (stag_static_tokens / stag_static_s), 2
        ),
        "target_staggered_ratio_vs_static": 1.3,
    }
    return result


def table(r: dict) -> str:
    lines = [
        f"{'mode':<30}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}",
        f"{'sequential model.generate':<30}{r['sequential_tokens']:>8}{r['sequential_s']:>10.1f}"
        f"{r['sequential_tokens_per_s']:>10.1f}",
        f"{'server, ' + str(r['requests']) + ' concurrent (HTTP)':<30}{r['server_tokens']:>8}"
        f"{r['server_s']:>10.1f}{r['server_tokens_per_s']:>10.1f}",
        f"{'static batch of ' + str(r['requests']) + ' (left-padded)':<30}{r['static_tokens']:>8}"
        f"{r['static_s']:>10.1f}{r['static_tokens_per_s']:>10.1f}",
        f"staggered arrivals (every {r['staggered_gap_s']}s): server {r['staggered_server_tokens_per_s']} "
        f"tokens/s vs static {r['staggered_static_tokens_per_s']}: {r['staggered_ratio_vs_static']}x "
        f"(target >= {r['target_staggered_ratio_vs_static']}x); all at once: {r['ratio_vs_static']}x static",
        f"ratio {r['ratio']}x sequential (target >= {r['target_ratio']}x); identical greedy outputs "
        f"{r['identical_outputs']}/{r['requests']}; server mean batch {r['server_mean_batch']}, "
        f"max {r['server_max_batch']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    import orjson

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    add_arguments(p)
    res = run(p.parse_args())
    print(table(res), file=sys.stderr)
    print(orjson.dumps(res).decode())
