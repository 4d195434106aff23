"""fairdistill from Python: the FAIR job, plain generation and the trainer without the CLI.

>>> import fairdistill
>>> records = fairdistill.generate(["What is 2 + 3?"], base_url=sim_url, model="gpt-sim")
>>> records[0].texts[0] != ""
True

``generate`` / ``agenerate`` (one completion per input, resumable), ``run`` / ``arun`` (a FAIR
job from a ``Config`` or a TOML path), ``Config`` (a job's config from Python values, checked
like a TOML file), ``read`` (a run directory's records; ``.to_dataset()``), ``train`` /
``evaluate`` (with the ``train`` extra). The synchronous calls work inside a running event loop
(Jupyter) by running in a worker thread. ``python -m fairdistill`` is the ``fair`` command.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use (__getattr__ below)
    from fairdistill.api import Config, Run, agenerate, arun, generate, run
    from fairdistill.engine.errors import AbortRun, ConfigError, FairError, UsageError
    from fairdistill.records import Records, read
    from fairdistill.training import evaluate, train

_HOME = {
    **dict.fromkeys(("Config", "Run", "agenerate", "arun", "generate", "run"), "fairdistill.api"),
    **dict.fromkeys(("AbortRun", "ConfigError", "FairError", "UsageError"), "fairdistill.engine.errors"),
    **dict.fromkeys(("Records", "read"), "fairdistill.records"),
    **dict.fromkeys(("evaluate", "train"), "fairdistill.training"),
}


def __getattr__(name: str) -> object:
    """The public names, imported when first used: `import fairdistill.trainer.data` (a GPU image
    without msgspec) does not pull in the API."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "AbortRun",
    "Config",
    "ConfigError",
    "FairError",
    "Records",
    "Run",
    "UsageError",
    "agenerate",
    "arun",
    "evaluate",
    "generate",
    "read",
    "run",
    "train",
]
