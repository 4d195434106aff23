"""GPU trainer check: tokens/s and MFU of one LoRA training step at Qwen2.5-0.5B's shape.

A randomly initialised model built from the config (no weights to download), bf16, SDPA,
gradient checkpointing, LoRA r=16 on all linear layers, the recipe's own loss
(``trainer.loss.per_token_loss``: output projection + chunked fp32 cross-entropy). Rows are
full causal sequences (no padding, no packing mask: the flash kernel applies), every token a
target, so the FLOPs are exactly those of the formula below.

MFU basis: 4·N FLOPs per token, N = the parameters in matmuls (embedding lookup excluded, the
tied output projection counted once): forward 2N plus the backward's activation gradients 2N;
frozen weights need no weight gradients (the LoRA matrices' own are < 1 % and not counted).
``mfu_with_attention`` adds causal-free attention, 12·layers·seq·d per token (fwd + bwd, PaLM's
convention). Recomputation by gradient checkpointing is not counted (model FLOPs, not hardware
FLOPs). The batch grows until it no longer fits (batch halves on OOM, from --batch).

    python -m benchmarks.gpu_train            # on a GPU (benchmarks/gpu_train.sh wraps it)
    python -m benchmarks.gpu_train --tiny     # seconds on CPU: the same code path, tiny shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

# Dense bf16 peak (no sparsity), TFLOP/s, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def qwen25_05b_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True,
        )  # fmt: skip
    # Qwen/Qwen2.5-0.5B config.json
    return Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    )  # fmt: skip


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding, plus a tied head once."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p is not embed)
    return n + (head.numel() if head is embed else 0)


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def build(args, device: str, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = qwen25_05b_config(args.tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    n_matmul = matmul_params(model)
    model.config.use_cache = False
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    model.train()
    return model, cfg, n_matmul


def measure(model, cfg, batch: int, seq: int, steps: int, warmup: int, device: str, dtype) -> list[float]:
    """Seconds per optimizer step (forward, backward, AdamW on the LoRA weights)."""
    import torch

    from trainer.data import Batch
    from trainer.loss import TaskTokens, micro_loss

    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    targets = torch.roll(ids, -1, dims=1)
    tasks = (torch.arange(batch, device=device) % 2)[:, None].expand(batch, seq).contiguous()
    b = Batch(ids, targets, tasks, None, None, batch, batch * seq)
    n = TaskTokens.of([b])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss, _ = micro_loss(model, b, 0.5, n)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU: checks the code path in seconds")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 128 GPU, 2 tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 4096 GPU, 64 tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, tiny 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--no-gc", dest="gc", action="store_false", help="no gradient checkpointing")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, if not in the table")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        args.gc = False
    batch = args.batch or (2 if args.tiny else 128)
    seq = args.seq or (64 if args.tiny else 4096)
    steps = args.steps or (3 if args.tiny else 10)
    warmup = 1 if args.tiny else args.warmup
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"

    t_build = time.perf_counter()
    model, cfg, n_matmul = build(args, device, dtype)
    build_s = time.perf_counter() - t_build
    while True:
        try:
            times = measure(model, cfg, batch, seq, steps, warmup, device, dtype)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"gpu_train: batch {batch} x {seq} does not fit; halving", file=sys.stderr)
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch //= 2

    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    flops_4n = 4 * n_matmul
    d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    flops_attn = 12 * cfg.num_hidden_layers * seq * d_attn
    peak = peak_flops(name, args.peak_tflops)
    result = {
        "device": name,
        "shape": "tiny" if args.tiny else "Qwen2.5-0.5B",
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": args.gc,
        "lora_rank": args.lora_rank,
        "matmul_params": n_matmul,
        "batch": batch,
        "seq": seq,
        "tokens_per_step": batch * seq,
        "step_s_median": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token_4n": flops_4n,
        "model_tflops_per_s": round(tokens_per_s * flops_4n / 1e12, 2),
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": round(tokens_per_s * flops_4n / peak, 4) if peak else None,
        "mfu_with_attention": round(tokens_per_s * (flops_4n + flops_attn) / peak, 4) if peak else None,
        "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
        "build_s": round(build_s, 1),
    }
    print(
        f"{name}: {result['shape']} LoRA r={args.lora_rank}, {batch}x{seq} tokens/step, "
        f"{step_s:.3f} s/step, {tokens_per_s:,.0f} tokens/s, MFU(4N) "
        f"{result['mfu'] if result['mfu'] is not None else 'n/a'}",
        file=sys.stderr,
    )
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
