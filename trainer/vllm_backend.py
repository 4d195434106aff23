"""vLLM helpers shared by ``fair eval --backend vllm`` and ``fair serve-student --backend vllm``.

vLLM is not a dependency (its wheel is GBs and needs CUDA): every path that wants it checks first
and stops with exit 2 and an install hint (``UsageError``), never falling back silently. What it
checks up front, so a GPU minute is not lost on a late failure:

* the model folder's ``config.json`` names ``architectures`` (vLLM picks the model class from it);
* ``max_lora_rank`` is one vLLM accepts and at least every adapter's rank;
* ``gpu_memory_utilization`` is in (0, 1];
* the trainer's CUDA memory is released before vLLM measures what is free.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import get_args

from fairdistill.engine.errors import UsageError
from fairdistill.trainer.adapters import parse_adapters

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] (vLLM >= 0.10;
# 0.6-0.9 accepted 8..256, older ones 8..64). The installed vLLM's own list wins when importable.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
STARTUP_TIMEOUT_S = 900.0  # loading, compiling and CUDA-graph capture can take minutes
INSTALL_HINT = (
    "vLLM is not installed: `pip install 'fairdistill[vllm]'` (or `pip install vllm`) on a machine "
    "with a CUDA GPU, or use --backend transformers (eval) / --backend cpu (serve-student)"
)


def have_vllm() -> bool:
    """The Python package (for the offline engine in ``fair eval``)."""
    return importlib.util.find_spec("vllm") is not None


def have_vllm_command() -> bool:
    return shutil.which("vllm") is not None


def vllm_executable() -> str:
    """The ``vllm`` command (for ``vllm serve``), or exit 2 with the install hint."""
    exe = shutil.which("vllm")
    if exe is None:
        raise UsageError(f"no `vllm` command on PATH. {INSTALL_HINT}")
    return exe


def require_vllm() -> None:
    if not have_vllm():
        raise UsageError(INSTALL_HINT)


def allowed_lora_ranks() -> tuple[int, ...]:
    """The ``max_lora_rank`` values the installed vLLM accepts (the current list without it)."""
    try:
        from vllm.config.lora import MaxLoRARanks  # type: ignore[import-not-found]

        return tuple(sorted(get_args(MaxLoRARanks))) or VLLM_MAX_LORA_RANKS
    except Exception:
        return VLLM_MAX_LORA_RANKS


def adapter_rank(path: str | Path) -> int:
    """The largest LoRA rank in an adapter folder (``r``, or a larger one in ``rank_pattern``)."""
    cfg_path = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])
    except FileNotFoundError:
        raise UsageError(f"{path}: not a LoRA adapter folder (no adapter_config.json)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{cfg_path}: no usable LoRA rank `r` ({exc})") from None


def choose_max_lora_rank(adapters: Mapping[str, str | Path], requested: int | None = None) -> int:
    """``requested`` if vLLM accepts it and it covers every adapter; by default the smallest such
    rank (a larger one costs GPU memory for nothing)."""
    allowed = allowed_lora_ranks()
    need = max((adapter_rank(p) for p in adapters.values()), default=1)
    if requested is not None:
        if requested not in allowed:
            raise UsageError(f"--max-lora-rank {requested}: vLLM accepts {', '.join(map(str, allowed))}")
        if requested < need:
            raise UsageError(f"--max-lora-rank {requested} is below the adapters' rank {need}")
        return requested
    fits = [r for r in allowed if r >= need]
    if not fits:
        raise UsageError(f"adapter rank {need} is above vLLM's largest max_lora_rank {allowed[-1]}")
    return fits[0]


def check_memory_utilization(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise UsageError(f"--gpu-memory-utilization {value}: must be in (0, 1]")
    return value


def model_folder(name: str | None) -> str:
    """A local HF folder (or hub id) vLLM can load: the embedded GGUF is dequantized into the cache
    once; a local folder gets ``architectures`` written in when it lacks it."""
    from fairdistill.trainer.model import ensure_architectures, load_student, resolve_model

    path, kwargs = resolve_model(name)
    if "gguf_file" in kwargs:  # vLLM wants an HF folder: dequantize once into the cache
        load_student(name, device="cpu")
        path, _ = resolve_model(name)
    if (Path(path) / "config.json").exists():
        try:
            ensure_architectures(path)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return path


def free_cuda_memory() -> int:
    """Release what this process's torch still caches on the GPU (a model trained just before,
    in the same process); returns the bytes freed. A no-op without torch or CUDA."""
    torch = sys.modules.get("torch")
    gc.collect()
    if torch is None or not torch.cuda.is_available():
        return 0
    before = torch.cuda.memory_reserved()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.ipc_collect()
    freed = before - torch.cuda.memory_reserved()
    if torch.cuda.memory_allocated():
        print(
            f"fair: {torch.cuda.memory_allocated() / 2**30:.1f} GiB of CUDA memory is still held by live "
            "tensors; vLLM gets what is left",
            file=sys.stderr,
        )
    return freed


def serve_argv(
    model: str,
    adapters: Mapping[str, str | Path],
    *,
    host: str,
    port: int,
    max_lora_rank: int | None = None,
    gpu_memory_utilization: float | None = None,
    served_model_name: str | None = None,
    executable: str = "vllm",
) -> list[str]:
    """The ``vllm serve`` command line: the model, and the adapters as ``--lora-modules NAME=PATH``
    (absolute paths: the server's working directory may differ)."""
    argv = [executable, "serve", model, "--host", host, "--port", str(port)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if adapters:
        argv += ["--enable-lora", "--lora-modules"]
        argv += [f"{name}={Path(p).resolve()}" for name, p in adapters.items()]
        argv += ["--max-lora-rank", str(choose_max_lora_rank(adapters, max_lora_rank))]
        argv += ["--max-loras", str(len(adapters))]
    if gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(check_memory_utilization(gpu_memory_utilization))]
    return argv


def serve_cli(args) -> int:
    """``fair serve-student --backend vllm``: ``vllm serve`` as a child process until SIGINT/SIGTERM.

    The child runs through ``engine.services`` in its own session, so a Ctrl-C reaches us first and
    we stop it (SIGTERM, SIGKILL after 20 s); our own SIGTERM takes the same path. Its output is
    ours. Exits 0 when stopped by a signal, 1 when vLLM exits by itself, 2 when it cannot start.
    """
    import time

    from fairdistill.engine.services import Services

    exe = vllm_executable()
    check_memory_utilization(args.gpu_memory_utilization)
    if not args.port:  # `--port 0`: pick a free one here, since we must know where to wait for it
        from fairdistill.engine.services import free_port

        args.port = free_port()
        print(f"fair serve-student: --port 0: using free port {args.port}", file=sys.stderr)
    adapters = {k: str(v) for k, v in parse_adapters(args.adapter).items()}
    model = model_folder(args.model)
    argv = serve_argv(
        model,
        adapters,
        host=args.host,
        port=args.port,
        max_lora_rank=args.max_lora_rank,
        gpu_memory_utilization=args.gpu_memory_utilization,
        executable=exe,
    )
    print("fair serve-student: " + shlex.join(argv), file=sys.stderr, flush=True)
    url = f"http://{args.host}:{args.port}/v1"
    try:
        with Services(Path(".")) as services:
            try:
                services.start_process("vllm", argv, f"{url}/models", STARTUP_TIMEOUT_S, grace=20, log=False)
            except (RuntimeError, TimeoutError) as exc:
                raise UsageError(f"vllm serve did not come up: {exc}") from None
            served = [model, *adapters]
            print(f"fair serve-student: vLLM serving {served} on {url}", file=sys.stderr, flush=True)
            while services.alive("vllm"):
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("fair serve-student: stopped", file=sys.stderr)
        return 0
    print("fair serve-student: vllm exited by itself", file=sys.stderr)
    return 1
