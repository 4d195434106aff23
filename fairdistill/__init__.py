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

from engine.errors import AbortRun, ConfigError, FairError, UsageError
from fairdistill.api import Config, Run, agenerate, arun, generate, run
from fairdistill.records import Records, read
from fairdistill.training import evaluate, train

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
