"""MkDocs hook: the reference pages, generated from the code at build time.

``reference/config.md`` from the msgspec Structs of ``engine.config`` (``engine.confdoc``: table,
type, default, range, description) and ``reference/cli.md`` from the argparse parser of
``engine.cli``, so neither can drift from what the program accepts. ``python
docs/hooks/reference.py OUT_DIR`` writes the same two pages to a folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fairdistill.engine import confdoc
from fairdistill.engine.cli import build_parser

PAGES = {"reference/config.md": "config_page", "reference/cli.md": "cli_page"}


def config_page() -> str:
    """Every table and field of a ``fair run`` config."""
    out = [
        "# Configuration reference",
        "",
        "Every field of a `fair run` TOML file, generated from the config Structs (`engine/config.py`).",
        "Values are range-checked when the file is loaded; an error names the file and the field.",
        "`fair init PATH` writes a starter with these descriptions as comments.",
        "",
    ]
    for table in confdoc.tables():
        out += [f"## `[{table.name}]`" if table.name else "## Top level", "", table.description, ""]
        out += ["| field | type | default | range | description |", "|---|---|---|---|---|"]
        for f in table.fields:
            if (table.name, f.name) in confdoc.HIDDEN:
                continue
            cells = [f"`{f.name}`", f.type, f"`{confdoc.toml_value(f.default)}`", f.range, f.description]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def cli_page() -> str:
    """Every command of ``fair`` with its usage, flags and examples."""
    parser = build_parser()
    out = ["# Command-line reference", "", "Generated from the `fair` argument parser (`engine/cli.py`).", ""]
    out += ["```text", parser.format_help().strip(), "```", ""]
    for name, sub in commands(parser).items():
        out += [f"## `fair {name}`", "", sub.description or "", ""]
        out += ["```text", sub.format_usage().strip(), "```", ""]
        out += ["| argument | default | description |", "|---|---|---|"]
        for action in arguments(sub):
            flag = ", ".join(action.option_strings) or action.dest
            default = (
                ""
                if action.default in (None, False, argparse.SUPPRESS) or action.required
                else action.default
            )
            choices = f" (one of: {', '.join(map(str, action.choices))})" if action.choices else ""
            help_text = (action.help or "").replace("%(default)s", str(action.default))
            out.append(f"| `{flag}` | {_cell(default)} | {_cell(help_text + choices)} |")
        out += ["", "```text", (sub.epilog or "").strip(), "```", ""]
    return "\n".join(out)


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``fair``'s subcommands by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def arguments(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    """A command's flags and positionals, without ``--help``."""
    return [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def on_files(files, config):  # MkDocs event: add the generated pages to the site
    from mkdocs.structure.files import File

    for path, make in PAGES.items():
        files.append(File.generated(config, path, content=globals()[make]()))
    return files


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "build/reference")
    for path, make in PAGES.items():
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_text(globals()[make]())
    print(f"wrote {', '.join(PAGES)} under {target}")
