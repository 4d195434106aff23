"""The vLLM paths without vLLM: the command lines they build, their checks, and the
``serve-student --backend vllm`` lifecycle against a stand-in ``vllm`` executable on PATH
(``tests/vllm_standin.py``: answers /v1/models, records its argv, exits on SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import vllm_standin

from fairdistill.engine.errors import UsageError
from fairdistill.engine.services import free_port
from fairdistill.trainer import vllm_backend as V

ROOT = Path(__file__).resolve().parent.parent


def adapter(folder: Path, r: int = 16, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA", **extra}))
    return folder


def bare_model(folder: Path) -> Path:
    """A model folder whose config.json lacks `architectures` (as the SmolLM2 cache used to)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return folder


@pytest.fixture
def standin(tmp_path: Path) -> dict:
    env = vllm_standin.install(tmp_path / "bin", tmp_path / "vllm-argv.json")
    return {"env": env, "exe": str(tmp_path / "bin" / "vllm"), "record": tmp_path / "vllm-argv.json"}


# -- ranks, memory, architectures --------------------------------------------------------------


def test_max_lora_rank_is_the_smallest_allowed_rank_that_covers_the_adapters(tmp_path: Path) -> None:
    assert V.allowed_lora_ranks() == V.VLLM_MAX_LORA_RANKS  # vLLM is not installed here
    assert V.choose_max_lora_rank({"a": adapter(tmp_path / "a", r=12)}) == 16
    assert V.choose_max_lora_rank({"a": adapter(tmp_path / "b", r=1)}) == 1
    pattern = adapter(tmp_path / "c", r=8, rank_pattern={"q_proj": 40})
    assert V.choose_max_lora_rank({"a": tmp_path / "a", "c": pattern}) == 64
    assert V.choose_max_lora_rank({"a": tmp_path / "a"}, requested=320) == 320
    with pytest.raises(
        UsageError, match=r"--max-lora-rank 12: vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512"
    ):
        V.choose_max_lora_rank({"a": tmp_path / "a"}, requested=12)
    with pytest.raises(UsageError, match="below the adapters' rank 40"):
        V.choose_max_lora_rank({"c": pattern}, requested=32)
    with pytest.raises(UsageError, match="above vLLM's largest max_lora_rank 512"):
        V.choose_max_lora_rank({"big": adapter(tmp_path / "big", r=1024)})
    with pytest.raises(UsageError, match="not a LoRA adapter folder"):
        V.choose_max_lora_rank({"x": tmp_path / "nothing"})


def test_gpu_memory_utilization_must_be_a_share() -> None:
    assert V.check_memory_utilization(0.5) == 0.5 and V.check_memory_utilization(None) is None
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UsageError, match="must be in"):
            V.check_memory_utilization(bad)


def test_model_folder_writes_the_missing_architectures(tmp_path: Path) -> None:
    folder = bare_model(tmp_path / "m")
    assert V.model_folder(str(folder)) == str(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_the_smollm2_cache_is_written_with_architectures(tmp_path: Path, monkeypatch) -> None:
    from fairdistill.trainer.model import _save_cache, load_tokenizer, tiny_llama

    tok = load_tokenizer()
    model = tiny_llama(len(tok))
    model.config.architectures = None  # as a GGUF-loaded config has it
    monkeypatch.setenv("FAIR_CACHE_DIR", str(tmp_path))
    _save_cache(model, tok)
    cfg = json.loads((tmp_path / "smollm2-135m-instruct" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_free_cuda_memory_is_a_no_op_without_cuda() -> None:
    import torch

    assert not torch.cuda.is_available()
    assert V.free_cuda_memory() == 0


# -- command lines -----------------------------------------------------------------------------


def test_vllm_serve_command_line(tmp_path: Path) -> None:
    a = adapter(tmp_path / "runs" / "train" / "adapter", r=16)
    b = adapter(tmp_path / "b", r=32)
    argv = V.serve_argv("/models/smol", {"fair": a, "other": b}, host="127.0.0.1", port=19301,
                        gpu_memory_utilization=0.6)  # fmt: skip
    assert argv == [
        "vllm", "serve", "/models/smol", "--host", "127.0.0.1", "--port", "19301",
        "--enable-lora", "--lora-modules", f"fair={a.resolve()}", f"other={b.resolve()}",
        "--max-lora-rank", "32", "--max-loras", "2", "--gpu-memory-utilization", "0.6",
    ]  # fmt: skip
    assert V.serve_argv("m", {}, host="h", port=1) == ["vllm", "serve", "m", "--host", "h", "--port", "1"]


def _fair(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairdistill", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_eval_backend_vllm_without_vllm_exits_2_with_the_install_hint() -> None:
    proc = _fair(
        "eval", "--backend", "vllm", "--datasets", "builtin", "--limit", "1", "--max-lora-rank", "16"
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "pip install 'fairdistill[vllm]'" in proc.stderr


def test_eval_rejects_a_bad_memory_share() -> None:
    proc = _fair("eval", "--backend", "vllm", "--gpu-memory-utilization", "1.5")
    assert proc.returncode == 2 and "--gpu-memory-utilization" in proc.stderr


def test_serve_student_vllm_without_vllm_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin"}
    proc = _fair("serve-student", "--backend", "vllm", "--adapter", str(adapter(tmp_path / "a")), env=env)
    assert proc.returncode == 2, proc.stderr
    assert "no `vllm` command on PATH" in proc.stderr and "pip install" in proc.stderr


# -- lifecycle ---------------------------------------------------------------------------------


def _wait_models(url: str, proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return [m["id"] for m in json.load(r)["data"]]
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_student_vllm_runs_vllm_serve_and_stops_it(tmp_path: Path, standin: dict, sig) -> None:
    model = bare_model(tmp_path / "model")
    lora = adapter(tmp_path / "runs" / "train" / "adapter", r=12)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairdistill", "serve-student", "--backend", "vllm", "--model", str(model),
         "--adapter", f"fair-r1={lora}", "--port", str(port), "--gpu-memory-utilization", "0.5"],
        cwd=ROOT, env=standin["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        served = _wait_models(f"http://127.0.0.1:{port}/v1/models", proc)
        assert served == [str(model), "fair-r1"]
        record = json.loads(standin["record"].read_text())
        assert record["argv"] == [
            "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--enable-lora", "--lora-modules", f"fair-r1={lora.resolve()}",
            "--max-lora-rank", "16", "--max-loras", "1", "--gpu-memory-utilization", "0.5",
        ]  # fmt: skip
        assert json.loads((model / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        time.sleep(0.6)  # past the start-up check: vllm is running, we wait on it
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"{standin['exe']} serve {model}" in err and "stopped" in err
    assert (Path(str(standin["record"]) + ".signal")).read_text() == "SIGTERM"  # forwarded as SIGTERM
    assert _gone(record["pid"])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        s.bind(("127.0.0.1", port))  # the port is free again


def test_serve_student_reports_vllm_dying_at_start(tmp_path: Path, standin: dict) -> None:
    Path(standin["exe"]).write_text(
        f"#!{sys.executable}\nimport sys\nprint('CUDA out of memory')\nsys.exit(1)\n"
    )
    proc = _fair("serve-student", "--backend", "vllm", "--model", str(bare_model(tmp_path / "m")),
                 "--port", str(free_port()), env=standin["env"])  # fmt: skip
    assert proc.returncode == 2
    assert "vllm serve did not come up: vllm exited early (code 1)" in proc.stderr
