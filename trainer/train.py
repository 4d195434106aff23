"""Recipe: distil the FAIR samples of one or more run directories into a student (LoRA or full).

Reads top to bottom in the order it runs (nanoGPT's loop in torchtune's recipe shape):

    config  ->  data (samples -> split by problem -> tokens)  ->  model (+ LoRA)  ->  optimizer,
    schedule  ->  resume?  ->  loop: [micro-batches -> loss -> backward] x grad_accum -> clip ->
    step -> log -> validate (keep best/) -> checkpoint  ->  OUT/adapter, metrics, plot

Features: LoRA via peft (all linear layers by default) or full fine-tuning; the FAIR loss
(``trainer.loss``: α·mistake + (1-α)·rationale from one mixed forward pass, token-normalised
across micro-batches); padding-free packing (``trainer.data``); bf16 + SDPA + gradient
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

Raises ``ConfigError`` for a bad config, ``FileNotFoundError`` for a missing run directory, and
``ValueError`` when the run directories hold no samples.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
import torch

from engine.errors import ConfigError
from trainer import data as D
from trainer.loss import TaskTokens, enable_packed_attention, micro_loss, per_token_loss

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


def _save_weights(model, tokenizer, folder: Path, finetune: str) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if finetune == "full":
        tokenizer.save_pretrained(tmp)
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
    """One status line on stderr: step, per-task loss, tokens/s, ETA (rewritten in place on a TTY)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()

    def update(self, row: dict, eta_s: float) -> None:
        if not self.enabled:
            return

        def fmt(v: float | None) -> str:
            return "  -  " if v is None else f"{v:.3f}"

        line = (
            f"step {row['step']}/{self.total}  loss {row['loss']:.3f}  "
            f"mistake {fmt(row['loss_mistake'])}  rationale {fmt(row['loss_rationale'])}  "
            f"{row['tokens_per_s']:.0f} tok/s  ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


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


# -- the recipe ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run the recipe; returns a summary dict. ``on_step(step, row)`` is called after every logged
    optimizer step (an exception raised there stops training, like a kill would)."""
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

    # -- data: samples -> split by problem -> tokens ---------------------------------------
    from trainer.model import load_student, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    samples = D.load_samples(cfg.inputs)
    if not samples:
        raise ValueError(f"no samples in {cfg.inputs}: run `fair run` first")
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
    micro_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total_steps = (
        cfg.max_steps
        if cfg.max_steps is not None
        else cfg.epochs * math.ceil(micro_per_epoch / cfg.grad_accum)
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * total_steps)

    # -- model: base (+ LoRA), resumed weights if any -------------------------------------
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
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    # -- optimizer and schedule ------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=on_gpu or None
    )

    # -- resume ----------------------------------------------------------------------------
    step, best_val, best_step, tokens_seen = 0, math.inf, None, 0
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        _warn_config_changes(state["config"], cfg)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # hyperparameters come from the config, moments from the file
            group["weight_decay"] = cfg.weight_decay
        set_rng_state(state["rng"])
        step, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        tokens_seen = state.get("tokens_seen", 0)
        if metrics_path.exists():  # rows logged after the checkpoint will be logged again
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
            kept = [r for r in rows if r["step"] <= step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif metrics_path.exists():
        metrics_path.unlink()

    progress = Progress(total_steps, cfg.progress)
    progress.note(
        f"fair train: {len(train_ex)} train / {len(val_ex)} val examples "
        f"({stats['truncated']} cut, {stats['dropped']} dropped), {n_trainable / 1e6:.2f}M trainable "
        f"params, {total_steps} steps on {device} ({dtype}), resumed at step {step}"
    )
    epoch_cache: dict[int, list[list[D.Example]]] = {}

    def micro_batches(step: int) -> list[D.Batch]:
        """The grad_accum micro-batches of optimizer step ``step`` (deterministic: resume-safe)."""
        out_batches = []
        for k in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            epoch, i = divmod(k, micro_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = D.epoch_batches(train_ex, cfg.batch_size, cfg.seed, epoch)
            group = epoch_cache[epoch][i]
            out_batches.append(D.collate(group, packing=cfg.packing, pad_id=pad_id).to(device))
        return out_batches

    def checkpoint() -> None:
        extra = {"step": step, "best_val": best_val, "best_step": best_step, "tokens_seen": tokens_seen}
        save_checkpoint(out, model, tokenizer, optimizer, cfg, extra)

    def validate() -> dict:
        nonlocal best_val, best_step
        row = estimate_val_loss(model, val_batches, cfg.alpha, device)
        if row and row["val_loss"] < best_val:
            best_val, best_step = row["val_loss"], step
            _save_weights(model, tokenizer, out / "best", cfg.finetune)
        return row

    # -- the loop --------------------------------------------------------------------------
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and dtype == torch.bfloat16 else None
    t_start, steps_timed, last_row, val_row = time.perf_counter(), 0, None, {}
    updating = False
    try:
        with open(metrics_path, "a") as log:
            while step < total_steps:
                t0 = time.perf_counter()
                batches = micro_batches(step)
                n = TaskTokens.of(batches)  # token counts over the whole step, before any forward
                ce_mis = ce_rat = 0.0
                for b in batches:
                    if autocast is not None:
                        with autocast:
                            loss, s = micro_loss(model, b, cfg.alpha, n)
                    else:
                        loss, s = micro_loss(model, b, cfg.alpha, n)
                    loss.backward()
                    ce_mis += s["ce_mistake"]
                    ce_rat += s["ce_rationale"]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
                lr = cfg.lr * get_lr(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
                for group in optimizer.param_groups:  # the schedule is a function of the step alone
                    group["lr"] = lr
                updating = True
                optimizer.step()
                updating = False
                optimizer.zero_grad(set_to_none=True)
                step += 1

                # -- log ---------------------------------------------------------------
                if on_gpu:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                step_tokens = sum(b.n_tokens for b in batches)
                tokens_seen += step_tokens
                steps_timed += 1
                mis = ce_mis / n.mistake if n.mistake else None
                rat = ce_rat / n.rationale if n.rationale else None
                row = {
                    "split": "train",
                    "step": step,
                    "epoch": step * cfg.grad_accum / micro_per_epoch,
                    "lr": lr,
                    "loss": cfg.alpha * (mis or 0.0) + (1 - cfg.alpha) * (rat or 0.0),
                    "loss_mistake": mis,
                    "loss_rationale": rat,
                    "loss_tokens": (ce_mis + ce_rat) / max(1, n.mistake + n.rationale),
                    "tokens_mistake": n.mistake,
                    "tokens_rationale": n.rationale,
                    "tokens": step_tokens,
                    "tokens_per_s": step_tokens / dt,
                    "grad_norm": float(grad_norm),
                    "step_s": dt,
                }
                last_row = row
                if step % cfg.log_every == 0 or step == total_steps:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    elapsed = time.perf_counter() - t_start
                    progress.update(row, elapsed / steps_timed * (total_steps - step))
                    if on_step is not None:
                        on_step(step, row)

                # -- validate, checkpoint ------------------------------------------------
                final = step == total_steps
                if val_batches and (final or (cfg.eval_every and step % cfg.eval_every == 0)):
                    val_row = validate()
                    log.write(json.dumps({"split": "val", "step": step, **val_row}) + "\n")
                    log.flush()
                    progress.note(
                        f"step {step}: val loss {val_row['val_loss']:.4f} (best {best_val:.4f} @ {best_step})"
                    )
                if final or (cfg.save_every and step % cfg.save_every == 0):
                    checkpoint()
    except KeyboardInterrupt:
        # The weights and optimizer are those of the last completed step, unless the interrupt
        # landed inside optimizer.step() (then the last saved checkpoint stands).
        if not updating and step > 0:
            checkpoint()
            progress.note(f"fair train: interrupted; checkpoint at step {step}, continue with --resume")
        raise
    finally:
        progress.close()

    # -- outputs ---------------------------------------------------------------------------
    final_dir = out / ("adapter" if cfg.finetune == "lora" else "model")
    _save_weights(model, tokenizer, final_dir, cfg.finetune)
    from trainer.plots import plot_losses

    plot = plot_losses(metrics_path, out / "loss.png")
    elapsed = time.perf_counter() - t_start
    return {
        "out": str(out),
        "adapter" if cfg.finetune == "lora" else "model": str(final_dir),
        "best": str(out / "best") if best_step is not None else None,
        "best_step": best_step,
        "best_val_loss": best_val if best_step is not None else None,
        "steps": step,
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        "truncated": stats["truncated"],
        "dropped": stats["dropped"],
        "trainable_params": n_trainable,
        "loss": last_row["loss"] if last_row else None,
        "loss_mistake": last_row["loss_mistake"] if last_row else None,
        "loss_rationale": last_row["loss_rationale"] if last_row else None,
        "val_loss": val_row.get("val_loss"),
        "tokens_seen": tokens_seen,
        "tokens_per_s": (tokens_seen / elapsed) if steps_timed else None,
        "elapsed_s": elapsed,
        "plot": str(plot) if plot else None,
    }


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
    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    return 0
