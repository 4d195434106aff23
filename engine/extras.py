"""Which optional extra (``pip install 'fairdistill[EXTRA]'``) provides a missing module.

``fair train`` on an install without torch must say which extra to install (exit 2), not crash
with a ``ModuleNotFoundError`` traceback (exit 70). Only these third-party names are mapped: a
missing module of our own is a bug and stays one.
"""

from __future__ import annotations

# top-level module -> the extra in pyproject.toml that installs it
EXTRAS = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "gguf": "train",
    "matplotlib": "train",
    "safetensors": "train",
    "vllm": "vllm",
    "ray": "ray",
    "openai": "bench",
    "uvloop": "uvloop",
}


def missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """One line naming the extra that provides the module ``exc`` is about; None if not ours."""
    name = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    return (
        f"{command}: needs the `{extra}` extra ({name} is not installed): pip install 'fairdistill[{extra}]'"
    )
