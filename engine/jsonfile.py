"""Read a JSON object from a file a user may have edited, or say which file is wrong and where.

``dataset_info.json`` (LLaMA-Factory), ``fair_training.json`` (a trained folder's record), a
model's ``config.json``: a bad one is one line naming the file, ``line:column`` and what is
wrong (``UsageError``, exit 2), never a ``JSONDecodeError`` traceback (exit 70).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fairdistill.engine.errors import UsageError


def read_json_object(path: str | Path, hint: str = "fix or remove it") -> dict[str, Any]:
    """The JSON object in ``path``; ``UsageError`` naming the file if it is anything else."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); {hint}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; {hint}") from None
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deeply; {hint}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(value).__name__}; {hint}")
    return value
