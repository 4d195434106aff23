"""PNG plots (matplotlib, Agg backend: no display needed): training losses and eval accuracy."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Both loss terms (and validation points) against the step, from ``metrics.jsonl``."""
    path = Path(metrics_path)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    if not train:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color in (
        ("loss_mistake", "mistake (train)", "tab:red"),
        ("loss_rationale", "rationale (train)", "tab:blue"),
    ):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=label, color=color, linewidth=1.2, alpha=0.85)
    for key, label, color in (
        ("val_loss_mistake", "mistake (val)", "tab:red"),
        ("val_loss_rationale", "rationale (val)", "tab:blue"),
    ):
        pts = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o--", label=label, color=color, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token-mean cross-entropy")
    ax.set_title("FAIR distillation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_accuracy(results: dict, out_png: str | Path, mode: str = "flexible") -> Path:
    """Grouped bars: accuracy per dataset (groups) and model (bars), 95 % Wilson interval as
    error bars. ``results`` is ``{model: {dataset: {mode: {"accuracy", "ci_low", "ci_high"}}}}``."""
    plt = _pyplot()
    models = list(results)
    datasets = sorted({d for m in models for d in results[m]})
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(datasets) * max(1, len(models)) ** 0.5), 4))
    for i, m in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for j, d in enumerate(datasets):
            r = results[m].get(d, {}).get(mode)
            if r is None:
                continue
            xs.append(j + (i - (len(models) - 1) / 2) * width)
            ys.append(100 * r["accuracy"])
            lo.append(100 * (r["accuracy"] - r["ci_low"]))
            hi.append(100 * (r["ci_high"] - r["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=m)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel(f"accuracy, % ({mode})")
    ax.set_title("Student accuracy (95 % Wilson interval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
