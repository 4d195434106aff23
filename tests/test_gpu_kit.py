"""The GPU kit on CPU: the accelerator image reproduced as a venv holding only torch, transformers,
peft and accelerate (no msgspec, orjson, tenacity), running the real ``benchmarks/gpu_train.sh``.

The venv is cached under ``build/test-image-venv/<hash of its pins>`` (ignored by git); a clean
clone builds it once (about a minute: torch comes from the local wheel or the index).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE_PACKAGES = {"torch", "transformers", "peft", "accelerate", "aiohttp", "numpy", "rich",
                  "prometheus-client", "uvloop"}  # fmt: skip
KIT_SCRIPT = ROOT / "scripts" / "gpu-kit.sh"


def _pins() -> list[str]:
    # the CPU build of torch, never unpinned; the others as installed next to the tests
    return ["torch==2.13.0", *(f"{p}=={version(p)}" for p in ("transformers", "peft", "accelerate"))]


@pytest.fixture(scope="module")
def image_python() -> Path:
    """A venv with only the image's training packages (and what they pull in)."""
    pins = _pins()
    key = hashlib.sha256(json.dumps([sys.version_info[:2], pins]).encode()).hexdigest()[:12]
    venv = ROOT / "build" / "test-image-venv" / key
    py = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        proc = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (venv / ".ready").touch()
    return py


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=ROOT, env={**full_env, **env}, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_gpu_train_tiny_runs_in_the_image_venv(image_python: Path, tmp_path: Path) -> None:
    probe = _run([str(image_python), "-c", "import msgspec"])
    assert probe.returncode != 0, "the image venv must not hold msgspec"
    proc = _run(
        ["bash", "benchmarks/gpu_train.sh", "--tiny", "--peak-tflops", "1"],
        PYTHON=str(image_python),
        OUT=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"using {image_python}" in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "gpu_train.json").read_text()) == result
    runs = {(r["mode"], r["compile"]): r for r in result["runs"]}
    assert set(runs) == {("full", None), ("full", "aot_eager"), ("lora", None), ("lora", "aot_eager")}
    for (mode, _), r in runs.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["mfu_basis"] == ("6N" if mode == "full" else "4N")
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"], abs=0.006)  # peak: 1 TFLOP/s
        assert r["mfu_with_attention"] >= r["mfu"]  # 4 decimals: equal when both are tiny
        assert r["tokens_per_s"] > 0 and r["batch_tokens"] == 512 and r["examples_per_step"] > 1
    # same seed, same batch: compiled and eager training compute the same loss
    assert runs[("full", None)]["loss"] == pytest.approx(runs[("full", "aot_eager")]["loss"], abs=1e-3)
    assert runs[("lora", None)]["trainable_params"] < runs[("full", None)]["trainable_params"] / 2
    assert result["mfu"] == max(runs[("full", c)]["mfu"] for c in (None, "aot_eager"))


@pytest.mark.slow
def test_gpu_kit_installs_the_missing_packages_offline(image_python: Path, tmp_path: Path) -> None:
    """``prepare`` (with an index) then ``exec`` (``--no-index``) makes the whole trainer importable."""
    without = _run([str(image_python), "-c", "import fairdistill.trainer.train"])
    assert "No module named 'msgspec'" in without.stderr
    kit = tmp_path / "kit"
    pyv = "{}.{}".format(*sys.version_info[:2])
    prep = _run(["bash", str(KIT_SCRIPT), "prepare"], GPU_KIT_DIR=str(kit), GPU_KIT_PY=pyv)
    if prep.returncode != 0 and "No matching distribution" in prep.stderr + prep.stdout:
        pytest.skip(f"no package index reachable for the kit's wheels: {prep.stderr[-300:]}")
    assert prep.returncode == 0, prep.stderr[-2000:]
    mods = "fairdistill.engine.rundir.store, fairdistill.trainer.train, fairdistill.trainer.evaluate"
    code = f"import {mods}, msgspec; print(msgspec.__file__)"
    proc = _run(
        ["bash", str(KIT_SCRIPT), "exec", str(image_python), "-c", code],
        GPU_KIT_DIR=str(kit),
        PYTHON=str(image_python),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(str(kit / f"site-{pyv}"))


def test_gpu_kit_refuses_wheels_for_another_python(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "PYTHON_VERSION").write_text("3.9\n")
    proc = _run(["bash", str(KIT_SCRIPT), "exec", "true"], GPU_KIT_DIR=str(kit), PYTHON=sys.executable)
    assert proc.returncode == 2 and "the wheels are for Python 3.9" in proc.stderr


def test_kit_packages_are_the_dependencies_the_image_lacks() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    kit = set(re.findall(r'"([a-z0-9-]+)>=', KIT_SCRIPT.read_text().split("PACKAGES=(", 1)[1].split(")")[0]))
    assert kit == names - IMAGE_PACKAGES


def test_gpu_train_sh_names_a_python_it_rejects(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = _run(["bash", "benchmarks/gpu_train.sh", "--tiny"], PYTHON=str(fake))
    assert proc.returncode == 2
    assert f"skip {fake}: ModuleNotFoundError" in proc.stderr and "no usable python" in proc.stderr


def test_flops_match_a_hand_count() -> None:
    """6N (full) / 4N (LoRA) with N counted by hand for the tiny shape, head only on targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fairdistill.benchmarks.gpu_train import llama_1b_config, packed_batch, step_flops

    cfg = llama_1b_config(tiny=True)
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    body = cfg.num_hidden_layers * (h * h * 2 + h * kv * 2 + 3 * h * i)
    head = cfg.vocab_size * h
    batch = packed_batch(cfg.vocab_size, 300, 40, 100)
    lens = [b - a for a, b in zip(batch.cu_seqlens, batch.cu_seqlens[1:], strict=False)]
    targets = 300 - len(lens)
    attn = cfg.num_hidden_layers * sum(6 * h * n * (n + 1) for n in lens)
    model = AutoModelForCausalLM.from_config(cfg)
    assert step_flops(model, cfg, batch, full=True) == (6 * (body * 300 + head * targets), attn)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert step_flops(lora, cfg, batch, full=False) == (4 * (body * 300 + head * targets), attn)
