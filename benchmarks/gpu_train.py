"""GPU training check: MFU, tokens/s and peak memory of full fine-tuning and LoRA on a ~1B Llama.

A randomly initialised model with Llama-3.2-1B's shape (no weights can be downloaded on the
accelerator), trained the way ``fair train`` trains: bf16 weights under bf16 autocast, fused AdamW,
packed rows (``trainer.data.collate_packed``: examples back to back, position ids restarting per
example) through the recipe's varlen SDPA (``trainer.loss.enable_packed_attention``: one causal
flash-attention call per example) and the recipe's loss (``trainer.loss.micro_loss``: output
projection on target positions only, chunked fp32 cross-entropy). Activation checkpointing is off
(``--gc`` turns it on). Four runs: full fine-tuning and LoRA (r=16, all linear layers), each eager
and with ``torch.compile`` (every decoder layer compiled; the batch keeps one packing layout, so
it compiles once).

MFU = model FLOPs / s over the device's dense bf16 peak (``PEAK_TFLOPS``, no sparsity):

* full fine-tuning: **6N** per token (forward 2N, backward 2N activation + 2N weight gradients);
* LoRA: **4N** per token: the frozen base weights need no weight gradients (the adapters' own,
  < 1 % of N, are not counted);

N = parameters in matmuls (the embedding lookup excluded, the tied output projection counted
once, and only for the target positions it runs on). ``mfu_with_attention`` adds the causal
attention of each packed example exactly (6·d·n(n+1) per layer, forward + backward).
Recomputation is never counted (model FLOPs, not hardware FLOPs).

Imports only torch, transformers, peft and ``trainer.data``/``trainer.loss`` (themselves free of
msgspec/orjson), so it runs on a bare accelerator image; ``tests/test_gpu_kit.py`` checks that in
a venv holding only torch, transformers, peft and accelerate.

    benchmarks/gpu_train.sh                   # on the GPU (under 5 minutes); JSON on the last line
    python -m fairdistill.benchmarks.gpu_train --tiny     # the same code path on CPU in a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

# Dense bf16 peak (no sparsity), TFLOP/s, by device-name fragment (first match wins).
PEAK_TFLOPS = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756: pass --peak-tflops 756
    "H800": 989.0,
    "H20": 148.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "MI300X": 1307.0,
    "RTX 4090": 165.0,
}
TARGET_FULL_MFU = 0.40


def llama_1b_config(tiny: bool):
    """Llama-3.2-1B's shape (1.24 B parameters, tied embeddings), or a 2-layer toy of it."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=True,
        )  # fmt: skip
    return LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500_000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def packed_batch(vocab: int, tokens: int, min_len: int, max_len: int, seed: int = 0):
    """One packed row of ``tokens`` random-token examples with lengths in [min_len, max_len]."""
    from fairdistill.trainer.data import IGNORE_INDEX, Example, collate_packed

    rng = random.Random(seed)
    examples, left = [], tokens
    while left > 0:
        n = min(left, rng.randint(min_len, max_len))
        ids = [rng.randrange(vocab) for _ in range(n)]
        targets = [*ids[1:], IGNORE_INDEX]  # every position but the last is trained on
        examples.append(Example(f"x{len(examples)}", f"p{len(examples)}", len(examples) % 2, ids, targets))
        left -= n
    return collate_packed(examples)


def step_flops(model, cfg, batch, full: bool) -> tuple[float, float]:
    """(model FLOPs of one step on the 6N / 4N basis, causal attention FLOPs of that step)."""
    import itertools

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    ids = {id(p) for p in [embed, head, *lora]}
    body = sum(p.numel() for p in model.parameters() if id(p) not in ids and p.dim() > 1)
    targets = int((batch.targets != -100).sum())
    per_n = 6 if full else 4
    flops = per_n * (body * batch.n_tokens + head.numel() * targets)
    d = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    attn = sum(6 * d * n * (n + 1) for n in (b - a for a, b in itertools.pairwise(batch.cu_seqlens)))
    return float(flops), float(attn * cfg.num_hidden_layers)


def build(cfg, full: bool, compiled: bool, args, device: str, dtype):
    import torch

    from fairdistill.trainer.loss import enable_packed_attention

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if not full:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    base = model.get_base_model() if not full else model
    if not enable_packed_attention(model):
        raise RuntimeError("the packed varlen attention did not switch on")
    if args.gc:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:
        for layer in base.get_decoder().layers:
            layer.compile(backend=args.compile_backend)
    model.train()
    return model


def one_run(cfg, full: bool, compiled: bool, args, device: str, dtype, peak: float | None) -> dict:
    """Build, warm up and time one configuration; the batch halves on out-of-memory."""
    import torch

    from fairdistill.trainer.loss import TaskTokens, micro_loss

    tokens = args.batch_tokens
    while True:
        model = opt = None
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            model = build(cfg, full, compiled, args, device, dtype)
            batch = packed_batch(cfg.vocab_size, tokens, args.min_len, min(args.max_len, tokens)).to(device)
            n = TaskTokens.of([batch])
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda" or None)
            autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
            build_s, times = time.perf_counter() - t0, []
            for _ in range(args.warmup + args.steps):
                _sync(device)
                t0 = time.perf_counter()
                with autocast:
                    loss, _ = micro_loss(model, batch, 0.5, n)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                times.append(time.perf_counter() - t0)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {float(loss)}")
            break
        except torch.OutOfMemoryError:
            del model, opt
            gc.collect()
            if tokens <= 1024:
                raise
            print(f"gpu_train: {tokens} tokens/step do not fit; halving", file=sys.stderr)
            tokens //= 2
    flops, attn = step_flops(model, cfg, batch, full)
    step_s = statistics.median(times[args.warmup :])
    row = {
        "mode": "full" if full else "lora",
        "compile": args.compile_backend if compiled else None,
        "mfu_basis": "6N" if full else "4N",
        "trainable_params": sum(p.numel() for p in params),
        "batch_tokens": batch.n_tokens,
        "examples_per_step": batch.n_examples,
        "step_s_median": round(step_s, 4),
        "first_step_s": round(times[0], 2),  # includes compilation
        "build_s": round(build_s, 2),
        "tokens_per_s": round(batch.n_tokens / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 2),
        "mfu": round(flops / step_s / peak, 4) if peak else None,
        "mfu_with_attention": round((flops + attn) / step_s / peak, 4) if peak else None,
        "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
        "loss": round(loss.item(), 4),
    }
    del model, opt, batch
    gc.collect()
    return row


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy on CPU: checks the code path")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per step (32768 GPU, 512 tiny)")
    p.add_argument("--min-len", type=int, default=None, help="shortest packed example (256; tiny 16)")
    p.add_argument("--max-len", type=int, default=None, help="longest packed example (2048; tiny 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (8; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (3; tiny 1)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--modes", default="full,lora", help="comma list of full, lora")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"], help="torch.compile runs")
    p.add_argument("--compile-backend", default=None, help="inductor (GPU) / aot_eager (tiny, no C compiler)")
    p.add_argument("--gc", action="store_true", help="activation checkpointing (off: 1B fits without)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip the runs not begun by then")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, if not in the table")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if not args.tiny and device == "cpu":
        print("gpu_train: no CUDA device; use --tiny for the CPU check", file=sys.stderr)
        raise SystemExit(2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tiny = args.tiny
    args.batch_tokens = args.batch_tokens or (512 if tiny else 32768)
    args.min_len = args.min_len or (16 if tiny else 256)
    args.max_len = args.max_len or (128 if tiny else 2048)
    args.steps = args.steps or (2 if tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.compile_backend = args.compile_backend or ("aot_eager" if tiny else "inductor")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = llama_1b_config(tiny)
    compiles = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    runs: list[dict] = []
    for mode in modes:
        for compiled in compiles:
            label = f"{mode}{' compiled' if compiled else ''}"
            if time.perf_counter() - t_start > args.budget_s:
                runs.append({"mode": mode, "compile": args.compile_backend if compiled else None,
                             "skipped": f"time budget {args.budget_s:.0f} s spent"})  # fmt: skip
                continue
            try:
                row = one_run(cfg, mode == "full", compiled, args, device, dtype, peak)
            except Exception as exc:  # one failing run (a compile error) must not hide the others
                row = {"mode": mode, "compile": args.compile_backend if compiled else None,
                       "error": f"{type(exc).__name__}: {exc}"[:500]}  # fmt: skip
            runs.append(row)
            print(f"gpu_train: {label}: " + json.dumps(row), file=sys.stderr, flush=True)
            if compiled:
                torch._dynamo.reset()  # compiled code holds on to the last run's model
            if args.out:  # what is done survives a timeout
                with open(args.out, "w") as f:
                    f.write(json.dumps({"partial": True, "device": name, "runs": runs}) + "\n")

    ok_full = [r for r in runs if r["mode"] == "full" and "mfu" in r]
    best = max(ok_full, key=lambda r: r["tokens_per_s"], default=None)
    result = {
        "device": name,
        "shape": "tiny" if tiny else "Llama-3.2-1B (random init)",
        "dtype": str(dtype).removeprefix("torch."),
        "packing": True,
        "gradient_checkpointing": args.gc,
        "lora_rank": args.lora_rank,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu_basis": "full: 6N, lora: 4N (frozen base: no weight gradients); N = matmul parameters",
        "target_full_mfu": TARGET_FULL_MFU,
        "mfu": best["mfu"] if best else None,  # the best full fine-tuning run
        "tokens_per_s": best["tokens_per_s"] if best else None,
        "runs": runs,
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
