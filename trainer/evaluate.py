"""Accuracy of the base student and of any number of trained adapters on the reasoning benchmarks.

Greedy decoding of the ``solve`` prompt (the same messages the student sees in a FAIR run),
graded with the engine's own extraction (``engine.fair.answers``): ``strict`` accuracy needs the
instructed final line, ``flexible`` takes the last number / yes-no / letter in the text, and
numbers are compared numerically. Each accuracy carries a 95 % Wilson score interval, which
stays inside [0, 1] and is honest at small n (unlike the normal approximation).

Backends: vLLM's offline engine when it is installed and a GPU is present (LoRA adapters served
by one engine through ``LoRARequest``), otherwise transformers ``generate`` in batches with left
padding, longest prompts first so each batch pads little.

Outputs under ``out``: ``results.json``, ``report.md`` (per-dataset tables, base vs adapters),
``accuracy.png`` (bars with the intervals) and ``wrong/<model>__<dataset>.jsonl`` (every item
the strict grader marked wrong, with both predictions and the generated text).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fairdistill.engine.rundir.schema import Problem

MODES = ("strict", "flexible")

# -- grading -----------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def grade(text: str, problem: Problem) -> dict:
    """Both gradings of one generated text with the engine's own ``engine.fair.answers.grade``, as
    the pipeline grades: the options (a flexible choice answer may quote an option's text) and the
    question (a free-form final statement is read for the unit it asks about) are passed."""
    from fairdistill.engine.fair.answers import grade as engine_grade

    row: dict = {}
    for mode in MODES:
        pred, ok = engine_grade(
            text, problem.answer, problem.task, mode=mode, options=problem.options, question=problem.question
        )
        row[mode], row[f"{mode}_ok"] = pred, ok
    return row


def accuracy(graded: Sequence[dict], mode: str) -> dict:
    k, n = sum(g[f"{mode}_ok"] for g in graded), len(graded)
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else 0.0, "ci_low": lo, "ci_high": hi, "correct": k, "n": n}


# -- generation backends -----------------------------------------------------------------------


def _chat(problem: Problem, version: str = "v1") -> list[dict]:
    from fairdistill.engine.fair.prompts import prompt_set

    return [{"role": m.role, "content": m.content} for m in prompt_set(version).render("solve", problem)]


def _is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


class HFGenerator:
    """transformers ``generate``: one base model, LoRA adapters switched in place with peft."""

    def __init__(self, model: str | None, adapters: dict[str, str], device: str | None = None):
        from fairdistill.trainer.model import load_student

        self.model, self.tok = load_student(model, device=device)
        self.model.eval()
        self.full: dict[str, str] = {}  # fully fine-tuned models: loaded when their turn comes
        self.loaded: dict = {}  # the one full model in memory
        self.peft = None
        for name, path in adapters.items():
            if not _is_adapter(path):
                self.full[name] = str(path)
                continue
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
        if self.peft is not None:
            self.peft.eval()

    def _model_for(self, name: str):
        if name in self.full:
            from fairdistill.trainer.model import load_student

            if name not in self.loaded:
                self.loaded = {name: load_student(self.full[name], device=str(self.model.device))[0].eval()}
            return self.loaded[name], contextlib.nullcontext()
        if self.peft is None:
            return self.model, contextlib.nullcontext()
        if name == "base":
            return self.peft, self.peft.disable_adapter()
        self.peft.set_adapter(name)
        return self.peft, contextlib.nullcontext()

    def generate(
        self, name: str, chats: list[list[dict]], max_new_tokens: int, batch_size: int, progress: bool = False
    ) -> tuple[list[str], int]:
        """Greedy completions in input order, and the number of generated tokens."""
        import torch
        from transformers import GenerationConfig

        tok = self.tok
        tok.padding_side = "left"  # generation appends on the right: prompts must end aligned
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: little padding
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts: list[str] = [""] * len(ids)
        n_generated = 0
        model, ctx = self._model_for(name)
        with ctx, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
                enc = {k: v.to(model.device) for k, v in enc.items()}
                out = model.generate(**enc, generation_config=gen)
                new = out[:, enc["input_ids"].shape[1] :]
                n_generated += int((new != tok.pad_token_id).sum())
                for i, row in zip(idx, new, strict=True):
                    texts[i] = tok.decode(row, skip_special_tokens=True)
                if progress:
                    print(f"\r  {name}: {start + len(idx)}/{len(ids)}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return texts, n_generated


class VLLMGenerator:
    """vLLM's offline engine (GPU): adapters are served per request through ``LoRARequest``.

    Checks before vLLM starts (``trainer.vllm_backend``): an allowed ``max_lora_rank`` covering the
    adapters, ``gpu_memory_utilization`` in (0, 1], ``architectures`` in the model's config; and
    the CUDA memory a model trained in this process still caches is released first."""

    def __init__(
        self,
        model: str | None,
        adapters: dict[str, str],
        *,
        gpu_memory_utilization: float | None = None,
        max_lora_rank: int | None = None,
    ):
        from fairdistill.trainer import vllm_backend as V

        V.require_vllm()
        self.adapters = {k: str(v) for k, v in adapters.items()}
        kwargs: dict = {"max_loras": max(1, len(self.adapters))}
        if self.adapters:
            rank = V.choose_max_lora_rank(self.adapters, max_lora_rank)
            kwargs |= {"enable_lora": True, "max_lora_rank": rank}
        if V.check_memory_utilization(gpu_memory_utilization) is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        path = V.model_folder(model)
        V.free_cuda_memory()
        from vllm import LLM

        self.llm = LLM(model=path, **kwargs)

    def generate(
        self, name: str, chats: list[list[dict]], max_new_tokens: int, batch_size: int, progress: bool = False
    ) -> tuple[list[str], int]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        lora = None
        if name != "base":
            lora = LoRARequest(name, list(self.adapters).index(name) + 1, self.adapters[name])
        outs = self.llm.chat(
            chats,
            SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
            lora_request=lora,
            use_tqdm=progress,
        )
        return [o.outputs[0].text for o in outs], sum(len(o.outputs[0].token_ids) for o in outs)


def pick_backend(backend: str, adapters: dict[str, str]) -> str:
    """``vllm`` asked for but not installed: exit 2 with the install hint (never a silent
    fallback); ``auto`` takes vLLM when it can and says so when it falls back to transformers."""
    from fairdistill.trainer import vllm_backend

    if backend == "vllm":
        vllm_backend.require_vllm()
    if backend != "auto":
        return backend
    import torch

    all_lora = all(_is_adapter(p) for p in adapters.values())
    why = (
        "vLLM is not installed" if not vllm_backend.have_vllm()
        else "no CUDA GPU" if not torch.cuda.is_available()
        else "a fully fine-tuned model is among the adapters" if not all_lora
        else None
    )  # fmt: skip
    if why is None:
        return "vllm"
    print(f"fair eval: backend auto -> transformers ({why})", file=sys.stderr)
    return "transformers"


# -- the evaluation ----------------------------------------------------------------------------


def _by_dataset(problems: dict[str, list[Problem]] | list[Problem] | None) -> dict[str, list[Problem]]:
    """Problems by dataset name: a plain list is grouped by ``Problem.dataset``."""
    if not isinstance(problems, list):
        return problems or {}
    grouped: dict[str, list[Problem]] = {}
    for p in problems:
        grouped.setdefault(p.dataset or "problems", []).append(p)
    return grouped


def _wrong_cases(texts: list[str], items: list[Problem], graded: list[dict]) -> list[dict]:
    """The answers not strictly right, with what each grading read (written beside the report)."""
    return [
        {
            "id": p.id,
            "question": p.question,
            "gold": p.answer,
            "strict": g["strict"],
            "flexible": g["flexible"],
            "flexible_ok": g["flexible_ok"],
            "text": t,
        }
        for t, p, g in zip(texts, items, graded, strict=True)
        if not g["strict_ok"]
    ]


def evaluate(
    model: str | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    problems: dict[str, list[Problem]] | list[Problem] | None = None,
    *,
    include_base: bool = True,
    batch_size: int = 16,
    max_new_tokens: int = 384,
    backend: str = "auto",
    out: str | Path | None = None,
    progress: bool = False,
    device: str | None = None,
    gpu_memory_utilization: float | None = None,
    max_lora_rank: int | None = None,
    overlap: Sequence[str] = (),
    prompt_versions: dict[str, str] | None = None,
) -> dict:
    """Generate and grade; returns ``{"results": {model: {dataset: {...}}}, ...}``.

    ``problems`` maps a dataset name to its problems (a plain list is grouped by
    ``Problem.dataset``). With ``out``, writes the report, plot and wrong cases there too.
    ``overlap``: notes of training questions scored anyway (``--allow-overlap``), shown in bold.
    ``prompt_versions``: model name -> prompt version of its ``solve`` prompt (default ``v1``), so
    a model trained on the paper's prompts is tested with them.
    """
    adapters_s = {k: str(v) for k, v in (adapters or {}).items()}
    problems = _by_dataset(problems)
    names = (["base"] if include_base else []) + list(adapters_s)
    if "base" in adapters_s:
        raise ValueError("'base' is reserved for the model without adapter")
    chosen = pick_backend(backend, adapters_s)
    gen: VLLMGenerator | HFGenerator
    if chosen == "vllm":
        gen = VLLMGenerator(
            model, adapters_s, gpu_memory_utilization=gpu_memory_utilization, max_lora_rank=max_lora_rank
        )
    else:
        gen = HFGenerator(model, adapters_s, device)

    results: dict[str, dict] = {}
    wrong: dict[tuple[str, str], list[dict]] = {}
    t0, n_tokens = time.perf_counter(), 0
    for name in names:
        results[name] = {}
        for dataset, items in problems.items():
            version = (prompt_versions or {}).get(name, "v1")
            chats = [_chat(p, version) for p in items]
            texts, n = gen.generate(name, chats, max_new_tokens, batch_size, progress)
            n_tokens += n
            graded = [grade(t, p) for t, p in zip(texts, items, strict=True)]
            results[name][dataset] = {mode: accuracy(graded, mode) for mode in MODES}
            wrong[(name, dataset)] = _wrong_cases(texts, items, graded)
    elapsed = time.perf_counter() - t0
    summary: dict = {
        "results": results,
        "backend": chosen,
        "model": model,
        "adapters": adapters_s,
        "elapsed_s": elapsed,
        "generated_tokens": n_tokens,
        "tokens_per_s": n_tokens / elapsed if elapsed else None,
        "overlap": list(overlap),
    }
    if out is not None:
        summary["files"] = write_outputs(summary, wrong, Path(out))
    return summary


# -- reporting ---------------------------------------------------------------------------------


def _pct(r: dict) -> str:
    return f"{100 * r['accuracy']:.1f} % [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def report_markdown(summary: dict) -> str:
    results = summary["results"]
    models = list(results)
    datasets = sorted({d for m in models for d in results[m]})
    lines = [
        "# Student evaluation",
        "",
        f"Greedy decoding, `{summary['backend']}` backend; accuracy with 95 % Wilson interval. "
        "strict = the instructed final line; flexible = the last answer-like token.",
        "",
        *(f"**Scored on training questions (--allow-overlap): {n}.**\n" for n in summary.get("overlap", [])),
        "| model | " + " | ".join(f"{d} strict | {d} flexible" for d in datasets) + " |",
        "|---|" + "---|---|" * len(datasets),
    ]
    for m in models:
        cells = []
        for d in datasets:
            r = results[m].get(d)
            cells += [_pct(r["strict"]), _pct(r["flexible"])] if r else ["-", "-"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = results.get("base", {})
    for d in datasets:
        lines += [
            "",
            f"## {d}",
            "",
            "| model | n | strict | flexible | Δ flexible vs base |",
            "|---|---|---|---|---|",
        ]
        for m in models:
            r = results[m].get(d)
            if r is None:
                continue
            delta = "-"
            if m != "base" and d in base:
                delta = f"{100 * (r['flexible']['accuracy'] - base[d]['flexible']['accuracy']):+.1f} pt"
            lines.append(
                f"| {m} | {r['strict']['n']} | {_pct(r['strict'])} | {_pct(r['flexible'])} | {delta} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict, wrong: dict[tuple[str, str], list[dict]], out: Path) -> dict:
    from fairdistill.trainer.plots import plot_accuracy

    out.mkdir(parents=True, exist_ok=True)
    (out / "wrong").mkdir(exist_ok=True)
    for (name, dataset), rows in wrong.items():
        path = out / "wrong" / f"{name}__{dataset}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report_markdown(summary))
    plot_accuracy(summary["results"], out / "accuracy.png")
    return {
        "results": str(out / "results.json"),
        "report": str(out / "report.md"),
        "plot": str(out / "accuracy.png"),
        "wrong": str(out / "wrong"),
    }


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` (or just ``DIR``: named after the folder, or its parent for ``.../adapter``)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = name
            p = Path(path)
            name = p.parent.name if p.name in ("adapter", "best", "model") and p.parent.name else p.name
        if not Path(path).is_dir():
            raise FileNotFoundError(f"adapter folder not found: {path}")
        out[name] = path
    return out


def check_overlap(
    adapters: dict[str, str], problems: dict[str, list[Problem]], split: str, *, allow: bool
) -> list[str]:
    """Refuse (ConfigError, exit 2) to score a trained model on questions of its own training
    samples; with ``allow`` the overlaps become notes that the report prints in bold."""
    from fairdistill.engine.errors import ConfigError
    from fairdistill.engine.fair.splits import RECORD, find_training_record, overlaps

    notes = []
    for name, path in adapters.items():
        record = find_training_record(path)
        if record is None:
            print(
                f"fair eval: {name}: {path} has no training record ({RECORD}); "
                "overlap with its training questions not checked",
                file=sys.stderr,
            )
            continue
        for items in problems.values():
            for where, ids in overlaps(record, items, split).items():
                note = (
                    f"{name} was trained on {len(ids)} of the {len(items)} {where} questions "
                    f"scored here (e.g. {ids[0]})"
                )
                if not allow:
                    raise ConfigError(
                        f"eval: refusing to score: {note}; evaluate another split, or pass --allow-overlap"
                    )
                notes.append(note)
    return notes


def cli_main(args) -> int:
    from fairdistill.engine.config import DatasetSection
    from fairdistill.engine.fair.datasets import load_problems
    from fairdistill.engine.jsonfile import read_json_object

    adapters = parse_adapters(args.adapter)
    for path in adapters.values():  # first: before the data, and not after minutes of loading a model
        if not _is_adapter(path):
            raise FileNotFoundError(f"--adapter {path}: not a LoRA adapter folder (no adapter_config.json)")
        read_json_object(Path(path) / "adapter_config.json")  # readable, else one line naming it
    problems = {
        name: load_problems(DatasetSection(name=name, split=args.split, limit=args.limit))
        for name in (d.strip() for d in args.datasets.split(",") if d.strip())
    }
    notes = check_overlap(adapters, problems, args.split, allow=getattr(args, "allow_overlap", False))
    summary = evaluate(
        args.model,
        adapters,
        problems,
        include_base=not args.no_base,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        out=args.out,
        progress=not args.no_progress,
        gpu_memory_utilization=getattr(args, "gpu_memory_utilization", None),
        max_lora_rank=getattr(args, "max_lora_rank", None),
        overlap=notes,
    )
    print(report_markdown(summary), file=sys.stderr)
    print(json.dumps({"results": summary["results"], "files": summary.get("files")}))
    return 0
