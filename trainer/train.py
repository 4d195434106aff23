"""Recipe: distil the FAIR samples of one or more run directories into a student (LoRA or full).

Reads top to bottom in the order it runs (nanoGPT's loop in torchtune's recipe shape):
``setup`` (config -> data: samples -> split by problem -> tokens -> model (+ LoRA) -> optimizer
-> resume?), ``run_loop`` ([batches -> loss -> backward] x grad_accum -> clip -> step -> log ->
validate (keep best/) -> checkpoint) and ``finish`` (OUT/adapter, plot, summary).

Features: LoRA via peft (all linear layers by default) or full fine-tuning; the FAIR loss
(``trainer.loss``: α·mistake + (1-α)·rationale, each a token mean over its own task, normalised
over the whole step). ``batching = "mixed"`` (default) feeds one batch per step in which the
shuffle mixes both tasks (one forward pass); ``"paired"`` is the paper's: a full rationale batch
and a full mistake batch per step (two forward passes; the smaller task's batches cycle);
padding-free packing (``trainer.data``); bf16 + SDPA + gradient
checkpointing on GPU, fp32 on CPU; warmup + cosine or constant schedule; seeded; a checkpoint
that holds everything resume needs (adapter, optimizer, step, RNG states, config; the lr is a
function of the step, as in nanoGPT, so no scheduler state);
``best/`` kept by validation loss; ``metrics.jsonl`` and ``loss.png``; progress on stderr.

Output folder::

    OUT/config.json        the resolved config
    OUT/metrics.jsonl      one row per logged step ({"split": "train"|"val", ...})
    OUT/checkpoint/        adapter/ (or model/) + state.pt (optimizer, step, RNG, config): --resume
    OUT/best/              adapter with the lowest validation loss
    OUT/adapter/           the final adapter: load_student(adapter="OUT/adapter")
    OUT/loss.png           both loss terms over the steps
    OUT/fair_training.json the input runs (dataset, split, id digests) and the trained problem
                           ids, also inside adapter/ and best/: `fair eval` refuses to score them

Raises ``ConfigError`` for a bad config, ``FileNotFoundError`` for a missing run directory, and
``ValueError`` when the run directories hold no samples.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import msgspec
import torch

from fairdistill.engine.errors import ConfigError, UsageError
from fairdistill.engine.fair import splits
from fairdistill.trainer import data as D
from fairdistill.trainer.loss import TaskTokens, enable_packed_attention, micro_loss, per_token_loss

# -- config -------------------------------------------------------------------------------------


class TrainConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every knob of the recipe; a TOML file maps onto it field by field (unknown keys are errors)."""

    inputs: list[str] = []  # run directories whose `samples` are the training data
    out: str = "runs/train"
    model: str | None = None  # HF id or local path; None = the embedded SmolLM2-135M-Instruct
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"  # peft: every linear layer but the head
    alpha: float = 0.5  # weight of the mistake-learning term
    # mixed: one batch per step, the two tasks as the shuffle mixes them (one forward pass);
    # paired: the paper's, a full rationale batch and a full mistake batch per step (two passes)
    batching: Literal["mixed", "paired"] = "mixed"
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # examples per micro-batch (one packed row)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 1024  # longer examples are cut (prompt kept, response shortened)
    packing: bool = True  # False: right-padded [B, L] batches
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int | None = None  # None: 5 % of the steps
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    val_fraction: float = 0.1  # share of *problems* held out
    eval_every: int = 50  # steps between validations (0: only at the end)
    save_every: int = 50  # steps between checkpoints (0: only at the end)
    log_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool | None = None  # None: on for GPU, off for CPU
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be within [0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be within [0, 1)")
        for name in ("batch_size", "grad_accum", "max_seq_len", "epochs", "lora_rank", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError("max_steps must be >= 0")


def load_config(path: str | Path) -> TrainConfig:
    try:
        return msgspec.toml.decode(Path(path).read_bytes(), type=TrainConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


# -- small pieces -------------------------------------------------------------------------------


def get_lr(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr at ``step`` (nanoGPT's get_lr, as a ratio)."""
    # 1) linear warmup
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    # 2) cosine decay from 1 to min_ratio over the remaining steps
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written ``tmp`` folder in for ``final`` (old copy kept until the swap is done)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _save_weights(model, tokenizer, folder: Path, finetune: str, provenance: dict | None = None) -> None:
    """Weights (and, for a full model, the tokenizer) plus the training record, swapped in whole."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if finetune == "full":
        tokenizer.save_pretrained(tmp)
    if provenance is not None:  # travels with the folder: `fair eval` refuses to score on these ids
        splits.write_training_record(tmp, provenance)
    _replace_dir(tmp, folder)


def save_checkpoint(out: Path, model, tokenizer, optimizer, cfg: TrainConfig, extra: dict) -> None:
    """OUT/checkpoint: weights + one ``state.pt`` with everything else resume needs."""
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = "adapter" if cfg.finetune == "lora" else "model"
    model.save_pretrained(tmp / weights)
    if cfg.finetune == "full":
        tokenizer.save_pretrained(tmp / weights)
    state = {
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "config": msgspec.to_builtins(cfg),
        **extra,
    }
    torch.save(state, tmp / "state.pt")
    _replace_dir(tmp, out / "checkpoint")


def find_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames
        if (out / name / "state.pt").exists():
            return out / name
    return None


_FROM_CHECKPOINT = {"model", "finetune", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"}


def _warn_config_changes(saved: dict, cfg: TrainConfig) -> None:
    """torchtune's resume check: name each value that differs from the checkpoint and say which wins.

    The weights' shape comes from the checkpoint; every other value is read afresh (a changed
    lr or schedule applies from the next step; a changed batch size, seed or split changes the
    data order, so the resumed run is no longer the continuation of the first)."""
    now = msgspec.to_builtins(cfg)
    quiet = {"resume", "progress", "max_steps", "epochs", "eval_every", "save_every", "log_every"}
    for key in sorted(set(saved) | set(now)):
        if key not in quiet and saved.get(key) != now.get(key):
            wins = "the checkpoint's value is kept" if key in _FROM_CHECKPOINT else "the new value applies"
            print(
                f"fair train: resume: {key} was {saved.get(key)!r} in the checkpoint, "
                f"now {now.get(key)!r}: {wins}",
                file=sys.stderr,
            )


class Progress:
    """The step bar on stderr (``engine.progress``: rich on a terminal, plain lines elsewhere):
    steps done, per-task loss, tokens/s, ETA; notes print above it."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        from fairdistill.engine.progress import Progress as Bar

        self.bar = Bar(total, label="step", enabled=enabled, requests=False)
        self.bar.resumed, self.start = start, start
        self.bar.start()

    def update(self, row: dict, eta_s: float) -> None:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        self.bar.done = row["step"] - self.start
        self.bar.fields.update(
            loss=f"{row['loss']:.3f}",
            mistake=fmt(row["loss_mistake"]),
            rationale=fmt(row["loss_rationale"]),
            tok_s=f"{row['tokens_per_s']:.0f}",
        )

    def note(self, text: str) -> None:
        self.bar.note(text)

    def close(self) -> None:
        self.bar.stop()


@torch.no_grad()
def estimate_val_loss(model, batches: list[D.Batch], alpha: float, device) -> dict:
    """Per-task token-mean loss over the validation batches (nanoGPT's estimate_loss)."""
    if not batches:
        return {}
    model.eval()
    sums, counts = [0.0, 0.0], [0, 0]
    for b in batches:
        ce, task = per_token_loss(model, b.to(device))
        for t in (0, 1):
            sums[t] += float(ce[task == t].sum())
            counts[t] += int((task == t).sum())
    model.train()
    rat = sums[0] / counts[0] if counts[0] else None
    mis = sums[1] / counts[1] if counts[1] else None
    loss = alpha * (mis or 0.0) + (1 - alpha) * (rat or 0.0)
    return {"val_loss": loss, "val_loss_mistake": mis, "val_loss_rationale": rat}


# -- the recipe: setup -------------------------------------------------------------------------


@dataclass
class Recipe:
    """Everything the loop needs, built by ``setup`` (torchtune's recipe shape: setup, then train)."""

    cfg: TrainConfig
    out: Path
    device: str
    on_gpu: bool
    dtype: torch.dtype
    tokenizer: object
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    train_ex: list[D.Example]
    val_ex: list[D.Example]
    stats: dict
    val_batches: list[D.Batch]
    pad_id: int
    units_per_epoch: int  # step units (micro-batches, or rationale+mistake pairs) per epoch
    total_steps: int
    warmup: int
    provenance: dict  # engine.fair.splits.training_record: what `fair eval` checks for leaks
    step: int = 0
    best_val: float = math.inf
    best_step: int | None = None
    tokens_seen: int = 0
    updating: bool = False  # inside optimizer.step(): an interrupt there must not checkpoint
    epoch_cache: dict[int, list[list[list[D.Example]]]] = field(default_factory=dict)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def micro_batches(self, step: int) -> list[D.Batch]:
        """The batches of optimizer step ``step`` (deterministic in the step: resume-safe): per
        accumulated unit one mixed batch, or under ``batching = "paired"`` a rationale batch
        and a mistake batch."""
        cfg, out = self.cfg, []
        for k in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            epoch, i = divmod(k, self.units_per_epoch)
            if epoch not in self.epoch_cache:
                self.epoch_cache.clear()
                self.epoch_cache[epoch] = D.step_units(
                    self.train_ex, cfg.batch_size, cfg.seed, epoch, cfg.batching
                )
            for group in self.epoch_cache[epoch][i]:
                out.append(D.collate(group, packing=cfg.packing, pad_id=self.pad_id).to(self.device))
        return out

    def save_weights(self, folder: Path) -> None:
        _save_weights(self.model, self.tokenizer, folder, self.cfg.finetune, self.provenance)

    def checkpoint(self) -> None:
        extra = {
            "step": self.step,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "tokens_seen": self.tokens_seen,
        }
        save_checkpoint(self.out, self.model, self.tokenizer, self.optimizer, self.cfg, extra)

    def validate(self) -> dict:
        row = estimate_val_loss(self.model, self.val_batches, self.cfg.alpha, self.device)
        if row and row["val_loss"] < self.best_val:
            self.best_val, self.best_step = row["val_loss"], self.step
            self.save_weights(self.out / "best")
        return row


def _setup_data(cfg: TrainConfig, tokenizer) -> tuple[list, list, list, dict, list]:
    """samples -> split by problem -> tokens; returns (samples, train, val, stats, val batches)."""
    samples = D.load_samples(cfg.inputs)
    if not samples:
        raise UsageError(f"no samples in {', '.join(map(str, cfg.inputs))}: run `fair run` first")
    train_samples, val_samples = D.split_by_problem(samples, cfg.val_fraction, cfg.seed)
    train_ex, stats = D.tokenize(train_samples, tokenizer, cfg.max_seq_len)
    val_ex, _ = D.tokenize(val_samples, tokenizer, cfg.max_seq_len)
    if not train_ex:
        raise ValueError("no training example fits max_seq_len")
    pad_id = tokenizer.pad_token_id or 0
    val_batches = [
        D.collate(val_ex[i : i + cfg.batch_size], packing=cfg.packing, pad_id=pad_id)
        for i in range(0, len(val_ex), cfg.batch_size)
    ]
    return samples, train_ex, val_ex, stats, val_batches


def _setup_model(cfg: TrainConfig, ckpt: Path | None, device: str, dtype, on_gpu: bool):
    """The base model (+ LoRA), resumed weights if any, packing and checkpointing switched on."""
    from fairdistill.trainer.model import load_student

    if ckpt is not None and cfg.finetune == "lora":
        model, _ = load_student(
            cfg.model, adapter=ckpt / "adapter", dtype=dtype, device=device, trainable_adapter=True
        )
    elif ckpt is not None:
        model, _ = load_student(str(ckpt / "model"), dtype=dtype, device=device)
    else:
        model, _ = load_student(cfg.model, dtype=dtype, device=device)
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
    base = model.get_base_model() if cfg.finetune == "lora" else model
    base.config.use_cache = False
    if cfg.packing:
        enable_packed_attention(model)  # varlen SDPA: no attention across (or computed between) examples
    if cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else on_gpu:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _resume(r: Recipe, ckpt: Path | None) -> None:
    """Optimizer moments, RNG, step and best-so-far from the checkpoint; metrics trimmed to it."""
    if ckpt is None:
        if r.metrics_path.exists():
            r.metrics_path.unlink()
        return
    state = torch.load(ckpt / "state.pt", weights_only=False)
    _warn_config_changes(state["config"], r.cfg)
    r.optimizer.load_state_dict(state["optimizer"])
    for group in r.optimizer.param_groups:  # hyperparameters come from the config, moments from the file
        group["weight_decay"] = r.cfg.weight_decay
    set_rng_state(state["rng"])
    r.step, r.best_val, r.best_step = state["step"], state["best_val"], state["best_step"]
    r.tokens_seen = state.get("tokens_seen", 0)
    if r.metrics_path.exists():  # rows logged after the checkpoint will be logged again
        kept = [row for row in _metric_rows(r.metrics_path) if row["step"] <= r.step]
        r.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def _metric_rows(path: Path) -> list[dict]:
    """The readable rows of ``metrics.jsonl``: a line torn by a crash mid-write is dropped (the
    steps after the checkpoint are logged again anyway), never a traceback on ``--resume``."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def setup(cfg: TrainConfig) -> Recipe:
    """config -> data -> model (+ LoRA) -> optimizer -> resume; writes OUT/config.json and the
    training record (``engine.fair.splits``: the input runs and the trained problem ids)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(out)
    if ckpt is not None and not cfg.resume:
        raise ConfigError(f"{out} already holds a checkpoint: pass --resume, or choose another --out")
    (out / "config.json").write_text(json.dumps(msgspec.to_builtins(cfg), indent=2))

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "float32": torch.float32}.get(
        cfg.dtype, torch.bfloat16
    )
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    from fairdistill.trainer.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    samples, train_ex, val_ex, stats, val_batches = _setup_data(cfg, tokenizer)
    provenance = splits.training_record(cfg.inputs, samples)
    splits.write_training_record(out, provenance)
    units = D.units_per_epoch(train_ex, cfg.batch_size, cfg.batching)
    total_steps = (
        cfg.max_steps if cfg.max_steps is not None else cfg.epochs * math.ceil(units / cfg.grad_accum)
    )
    model = _setup_model(cfg, ckpt, device, dtype, on_gpu)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=on_gpu or None
    )
    r = Recipe(
        cfg=cfg,
        out=out,
        device=device,
        on_gpu=on_gpu,
        dtype=dtype,
        tokenizer=tokenizer,
        model=model,
        params=params,
        optimizer=optimizer,
        train_ex=train_ex,
        val_ex=val_ex,
        stats=stats,
        val_batches=val_batches,
        pad_id=tokenizer.pad_token_id or 0,
        units_per_epoch=units,
        total_steps=total_steps,
        warmup=cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * total_steps),
        provenance=provenance,
    )
    _resume(r, ckpt)
    return r


# -- the recipe: the loop -----------------------------------------------------------------------


StepFigures = tuple[list[D.Batch], TaskTokens, float, float, float, float]  # what train_step returns


def train_step(r: Recipe, autocast) -> StepFigures:
    """One optimizer step: forward/backward every batch of the step, clip, update.

    Returns (batches, token counts, ce sum mistake, ce sum rationale, grad norm, lr)."""
    cfg = r.cfg
    batches = r.micro_batches(r.step)
    n = TaskTokens.of(batches)  # token counts over the whole step, before any forward
    ce_mis = ce_rat = 0.0
    for b in batches:
        with autocast if autocast is not None else contextlib.nullcontext():
            loss, s = micro_loss(r.model, b, cfg.alpha, n)
        loss.backward()
        ce_mis += s["ce_mistake"]
        ce_rat += s["ce_rationale"]
    grad_norm = torch.nn.utils.clip_grad_norm_(r.params, cfg.grad_clip or math.inf)
    lr = cfg.lr * get_lr(r.step, r.total_steps, r.warmup, cfg.schedule, cfg.min_lr_ratio)
    for group in r.optimizer.param_groups:  # the schedule is a function of the step alone
        group["lr"] = lr
    r.updating = True
    r.optimizer.step()
    r.updating = False
    r.optimizer.zero_grad(set_to_none=True)
    r.step += 1
    return batches, n, ce_mis, ce_rat, float(grad_norm), lr


def _announce(r: Recipe, progress: Progress) -> None:
    """The one line saying what this run trains, on how much data, where and from which step."""
    cfg = r.cfg
    n_trainable = sum(p.numel() for p in r.params)
    progress.note(
        f"fair train: {len(r.train_ex)} train / {len(r.val_ex)} val examples "
        f"({r.stats['truncated']} cut, {r.stats['dropped']} dropped), {n_trainable / 1e6:.2f}M trainable "
        f"params, {r.total_steps} steps ({cfg.batching} batches) on {r.device} ({r.dtype}), "
        f"resumed at step {r.step}"
    )


def _train_row(r: Recipe, step: StepFigures, dt: float) -> dict:
    """The metrics row of the optimizer step just taken in ``dt`` seconds (counts its tokens)."""
    cfg = r.cfg
    batches, n, ce_mis, ce_rat, grad_norm, lr = step
    step_tokens = sum(b.n_tokens for b in batches)
    r.tokens_seen += step_tokens
    mis = ce_mis / n.mistake if n.mistake else None
    rat = ce_rat / n.rationale if n.rationale else None
    return {
        "split": "train",
        "step": r.step,
        "epoch": r.step * cfg.grad_accum / r.units_per_epoch,
        "lr": lr,
        "loss": cfg.alpha * (mis or 0.0) + (1 - cfg.alpha) * (rat or 0.0),
        "loss_mistake": mis,
        "loss_rationale": rat,
        "loss_tokens": (ce_mis + ce_rat) / max(1, n.mistake + n.rationale),
        "tokens_mistake": n.mistake,
        "tokens_rationale": n.rationale,
        "tokens": step_tokens,
        "tokens_per_s": step_tokens / dt,
        "grad_norm": grad_norm,
        "step_s": dt,
    }


def _validate_and_save(r: Recipe, log: IO[str], progress: Progress) -> dict | None:
    """Validation (its row logged) and a checkpoint where the schedule says, after a step; the
    validation row, or None when there was none."""
    cfg = r.cfg
    final = r.step == r.total_steps
    val_row = None
    if r.val_batches and (final or (cfg.eval_every and r.step % cfg.eval_every == 0)):
        val_row = r.validate()
        log.write(json.dumps({"split": "val", "step": r.step, **val_row}) + "\n")
        log.flush()
        progress.note(
            f"step {r.step}: val loss {val_row['val_loss']:.4f} (best {r.best_val:.4f} @ {r.best_step})"
        )
    if final or (cfg.save_every and r.step % cfg.save_every == 0):
        r.checkpoint()
    return val_row


def run_loop(r: Recipe, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Steps until ``total_steps``, logging, validating and checkpointing; returns loop figures."""
    cfg = r.cfg
    progress = Progress(r.total_steps, cfg.progress, start=r.step)
    _announce(r, progress)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if r.on_gpu and r.dtype == torch.bfloat16 else None
    )
    t_start, steps_timed, last_row, val_row = time.perf_counter(), 0, None, {}
    try:
        with open(r.metrics_path, "a") as log:
            while r.step < r.total_steps:
                t0 = time.perf_counter()
                step = train_step(r, autocast)
                if r.on_gpu:
                    torch.cuda.synchronize()
                last_row = row = _train_row(r, step, time.perf_counter() - t0)
                steps_timed += 1
                if r.step % cfg.log_every == 0 or r.step == r.total_steps:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    elapsed = time.perf_counter() - t_start
                    progress.update(row, elapsed / steps_timed * (r.total_steps - r.step))
                    if on_step is not None:
                        on_step(r.step, row)
                if (validated := _validate_and_save(r, log, progress)) is not None:
                    val_row = validated
    except KeyboardInterrupt:
        # The weights and optimizer are those of the last completed step, unless the interrupt
        # landed inside optimizer.step() (then the last saved checkpoint stands).
        if not r.updating and r.step > 0:
            r.checkpoint()
            progress.note(f"fair train: interrupted; checkpoint at step {r.step}, continue with --resume")
        raise
    finally:
        progress.close()
    return {
        "last_row": last_row,
        "val_row": val_row,
        "elapsed_s": time.perf_counter() - t_start,
        "steps_timed": steps_timed,
    }


def finish(r: Recipe, loop: dict) -> dict:
    """OUT/adapter (or model), the loss plot, and the summary."""
    cfg = r.cfg
    final_dir = r.out / ("adapter" if cfg.finetune == "lora" else "model")
    r.save_weights(final_dir)
    from fairdistill.trainer.plots import plot_losses

    plot = plot_losses(r.metrics_path, r.out / "loss.png")
    last, elapsed = loop["last_row"], loop["elapsed_s"]
    return {
        "out": str(r.out),
        "adapter" if cfg.finetune == "lora" else "model": str(final_dir),
        "best": str(r.out / "best") if r.best_step is not None else None,
        "best_step": r.best_step,
        "best_val_loss": r.best_val if r.best_step is not None else None,
        "steps": r.step,
        "batching": cfg.batching,
        "train_examples": len(r.train_ex),
        "val_examples": len(r.val_ex),
        "truncated": r.stats["truncated"],
        "dropped": r.stats["dropped"],
        "trainable_params": sum(p.numel() for p in r.params),
        "loss": last["loss"] if last else None,
        "loss_mistake": last["loss_mistake"] if last else None,
        "loss_rationale": last["loss_rationale"] if last else None,
        "val_loss": loop["val_row"].get("val_loss"),
        "tokens_seen": r.tokens_seen,
        "tokens_per_s": (r.tokens_seen / elapsed) if loop["steps_timed"] else None,
        "elapsed_s": elapsed,
        "plot": str(plot) if plot else None,
        "training_record": str(r.out / splits.RECORD),
    }


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run the recipe; returns a summary dict. ``on_step(step, row)`` is called after every logged
    optimizer step (an exception raised there stops training, like a kill would)."""
    r = setup(cfg)
    return finish(r, run_loop(r, on_step))


# -- command line -------------------------------------------------------------------------------


def config_from_args(args) -> TrainConfig:
    """``fair train RUN_DIR... | CONFIG.toml [RUN_DIR...]`` plus flags; flags override the file."""
    inputs = list(args.inputs)
    base: dict = {}
    if inputs and inputs[0].endswith(".toml"):
        base = msgspec.to_builtins(load_config(inputs.pop(0)))
    if inputs:
        base["inputs"] = inputs
    overrides = {
        "out": args.out,
        "model": args.model,
        "max_steps": args.max_steps,
        "alpha": getattr(args, "alpha", None),
        "lr": getattr(args, "lr", None),
        "batch_size": getattr(args, "batch_size", None),
        "grad_accum": getattr(args, "grad_accum", None),
        "epochs": getattr(args, "epochs", None),
        "lora_rank": getattr(args, "lora_rank", None),
        "seed": getattr(args, "seed", None),
        "max_seq_len": getattr(args, "max_seq_len", None),
        "batching": getattr(args, "batching", None),
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "full", False):
        base["finetune"] = "full"
    if getattr(args, "no_packing", False):
        base["packing"] = False
    if args.resume:
        base["resume"] = True
    if getattr(args, "no_progress", False):
        base["progress"] = False
    try:
        return msgspec.convert(base, TrainConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"train config: {exc}") from exc


def cli_main(args) -> int:
    cfg = config_from_args(args)
    if not cfg.inputs:
        raise ConfigError("train: no run directory given (positional RUN_DIR or `inputs` in the TOML)")
    _check_inputs(cfg.inputs)  # before the model loads: a bad path costs a second, not a minute
    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def _check_inputs(inputs) -> None:
    """Each input is a run directory holding at least one sample (UsageError, exit 2, if not)."""
    from fairdistill.engine.rundir.store import iter_records

    for run_dir in map(Path, inputs):
        if not run_dir.is_dir():
            raise UsageError(f"{run_dir}: no such run directory")
        if next(iter_records(run_dir, "samples"), None) is None:
            raise UsageError(f"{run_dir}: no samples in this run directory: run `fair run` first")
