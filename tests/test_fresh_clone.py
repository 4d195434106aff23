"""The README's test command on a newcomer's machine: a checkout with no ``../shared`` beside it.

The checkout is the working tree's files as ``git`` would commit them: tracked plus untracked
files that are not ignored (``git ls-files -co --exclude-standard``), copied into a temporary
folder. A ``git clone`` would test the last commit instead, missing the change under test; on a
clean checkout (CI) both are the same files. No ``.venv``, ``runs/`` or caches come along.

In that copy, with ``FAIR_DATA_DIR`` and ``FAIR_REQUIRE_DATA`` unset: the whole suite must be
collected without an error, and the tests that touch the reference datasets must pass or skip
with a reason, never fail (the eval test below failed there once: the missing dataset was
reported before the bad adapter).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# cheap tests that look for ../shared/datasets (or ran into it by accident once)
SUBSET = [
    "tests/test_bad_inputs.py::test_an_adapter_folder_without_adapter_config_fails_before_loading",
    "tests/test_datasets.py",
    "tests/test_splits.py",
    "tests/test_scoring.py",
    "tests/test_bench_replay.py",
    "tests/test_cli_faults.py::test_eval_names_the_adapter_before_looking_for_data",
]


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_symlink():  # fairdistill/engine -> ../engine (the mapped folders), as git has it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).symlink_to(os.readlink(src))
        elif src.is_file():  # (a tracked file deleted in the working tree is not there to copy)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (or no git): nothing to copy as a fresh clone")
    dest = tmp_path_factory.mktemp("fresh") / "main"  # its ../shared does not exist
    _copy_checkout(dest)
    assert not (dest.parent / "shared").exists() and not (dest / ".venv").exists()
    return dest


def _pytest(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FAIR_DATA_DIR", "FAIR_REQUIRE_DATA")}
    env["PYTHONPATH"] = str(checkout)  # the copy's packages, not the editable install's
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_copy_imports_its_own_code(checkout: Path):
    proc = subprocess.run(
        [sys.executable, "-c", "import fairdistill.engine as e; print(e.__file__)"],
        cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True,
    )  # fmt: skip
    assert Path(proc.stdout.strip()).resolve().is_relative_to(checkout.resolve()), proc.stdout


def test_a_fresh_clone_collects_every_test(checkout: Path):
    proc = _pytest(checkout, "--collect-only", "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " collected" in proc.stdout and "error" not in proc.stdout.splitlines()[-1].lower()


def test_tests_that_need_data_skip_on_a_fresh_clone(checkout: Path):
    proc = _pytest(checkout, "-q", "-m", "not slow", "-rs", *SUBSET)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail  # nothing failed, nothing errored
    assert "skipped" in proc.stdout and "datasets" in proc.stdout, tail  # ...and they say why
