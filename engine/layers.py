"""The layer order of the code, in one table: ``tests/test_layers.py`` enforces it and
``docs/architecture.md`` shows it.

Imports flow one way, top to bottom: a module imports modules of its own layer or of a layer
below, never above (function-level and ``TYPE_CHECKING`` imports included: a lazy import is still
an import), and the import graph has no cycle. A module belongs to the layer of the longest prefix
that names it (``engine.rundir.schema`` is base although ``engine.rundir`` is rundir)::

    cli | fairdistill    the ``fair`` command (flags -> typed options) and the Python API
    launch               pick the mode: one process, --estimate, --ray; finish the run once
    scale                Ray driver, workers, limiter actor: blocks through public entry points
    fair | generate      the FAIR method and plain generation; neither knows Ray exists
    request              cache -> admission -> retry -> executor; providers; events and observers
    rundir | config      the run directory (store, reader, export, repair...) and the TOML config
    base                 errors, types, the record and wire Structs, small pure helpers

Beside them stand the simulator (``engine.sim``) and the trainer (``trainer``): only the top
layers (cli, launch) import them, and they import only ``PURE`` modules of the engine (and their
own package), never the request path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """One row of the order: a name and the module prefixes that belong to it."""

    name: str
    modules: tuple[str, ...]


# top to bottom
LAYERS: tuple[Layer, ...] = (
    Layer(
        "cli | fairdistill",
        ("engine.cli", "engine.cliopts", "engine.clihelp", "engine.flagcheck", "fairdistill"),
    ),
    Layer("launch", ("engine.launch",)),
    Layer("scale", ("engine.scale",)),
    Layer("fair | generate", ("engine.fair", "engine.generate")),
    Layer("request", ("engine.request", "engine.progress")),
    Layer(
        "rundir | config",
        ("engine.rundir", "engine.config", "engine.options", "engine.confdoc", "engine.starter"),
    ),
    Layer(
        "base",
        (
            "engine",  # the package itself (its version); matches only itself, not engine.*
            "engine.errors",
            "engine.types",
            "engine.wire",
            "engine.layers",
            "engine.rundir.schema",  # the record Structs: the contract between engine and trainer
            "engine.jsonfile",
            "engine.inputs",
            "engine.accepts",  # what each model accepts: the encoders and the config loader read it
            "engine.exposition",
            "engine.extras",
            "engine.services",
            "engine.server_thread",
        ),
    ),
)

# beside the layers: imported only by the TOP layers, importing only PURE modules and themselves
BESIDE: tuple[str, ...] = ("engine.sim", "trainer")
TOP: tuple[str, ...] = ("cli | fairdistill", "launch")

# what the simulator and the trainer may import from the engine: the two bottom layers and the
# method's pure parts; no request path, no Ray, no network. Closed: a PURE module imports only PURE
# modules (tests/test_layers.py checks it), so nothing impure comes in through the back door.
PURE: tuple[str, ...] = (
    *LAYERS[-1].modules,
    *LAYERS[-2].modules,
    "engine.fair.answers",
    "engine.fair.datasets",
    "engine.fair.errortypes",
    "engine.fair.prompts",
    "engine.fair.splits",
    "engine.progress",  # the stderr progress bar (``fair train`` shows its steps with it)
    "engine.request.events",  # the request event values the progress bar observes
)


def pure(module: str) -> bool:
    """Whether ``module`` is one of the engine's pure modules (``PURE``)."""
    return any(_matches(module, p) for p in PURE)


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or (prefix != "engine" and module.startswith(prefix + "."))


def place(module: str) -> str | None:
    """The layer (its name) or side package (``engine.sim``, ``trainer``) of ``module``; None if
    the table does not place it (a new module must be added here)."""
    best, where = "", None
    for layer in LAYERS:
        for prefix in layer.modules:
            if _matches(module, prefix) and len(prefix) > len(best):
                best, where = prefix, layer.name
    for side in BESIDE:
        if _matches(module, side) and len(side) > len(best):
            best, where = side, side
    return where


def refusal(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (both placed), or None when it may."""
    src, dst = place(importer), place(imported)
    names = [layer.name for layer in LAYERS]
    if src == dst:
        return None
    if dst in BESIDE:
        return None if src in TOP else f"only {' and '.join(TOP)} import {dst}"
    if src in BESIDE:
        if pure(imported):
            return None
        return f"{src} imports only engine.layers.PURE"
    assert src is not None and dst is not None
    if names.index(dst) < names.index(src):
        return f"upward: {src} -> {dst}"
    return None
