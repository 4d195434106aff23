"""The documentation can be trusted: every config field has a description and every CLI flag a
help text (the reference pages are generated from both), every command's help ends with
examples, and no file in the repository points at a file that is not in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fairdistill.engine import confdoc
from fairdistill.engine.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import reference  # noqa: E402  (docs/hooks/reference.py: the MkDocs hook that writes the pages)


def test_every_config_field_and_table_has_a_description() -> None:
    missing = [f"{f.table}.{f.name}".lstrip(".") for f in confdoc.fields() if not f.description.strip()]
    assert not missing, f"config fields without Meta(description=...): {missing}"
    assert all(t.description for t in confdoc.tables())
    page = reference.config_page()
    for f in confdoc.fields():
        if (f.table, f.name) not in confdoc.HIDDEN:
            assert f"| `{f.name}` |" in page and f.description.split("`")[0][:30] in page


def test_every_command_and_flag_has_help_and_examples() -> None:
    parser = build_parser()
    missing = [
        f"fair {name} {a.option_strings or a.dest}"
        for name, sub in reference.commands(parser).items()
        for a in reference.arguments(sub)
        if not (a.help or "").strip()
    ]
    assert not missing, f"flags without help=: {missing}"
    page = reference.cli_page()
    for name, sub in reference.commands(parser).items():
        assert sub.description, f"fair {name}: no description"
        assert (sub.epilog or "").startswith("examples:\n  fair "), f"fair {name}: no examples"
        assert f"## `fair {name}`" in page


def test_fair_help_speaks_to_a_user() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fairdistill", "--help"], capture_output=True, text=True
    ).stdout
    assert "No logic lives here" not in out and "hand over to the library" not in out
    assert out.rstrip().splitlines()[-1].startswith("  fair run ")  # ends with an example
    run = subprocess.run(
        [sys.executable, "-m", "fairdistill", "run", "--help"], capture_output=True, text=True
    )
    assert "TOML file" in run.stdout and "resumes it" in run.stdout and "--run-dir" in run.stdout


def test_every_page_is_in_the_nav_and_readme_is_a_front_page() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    assert pages and all(p in nav for p in pages), [p for p in pages if p not in nav]
    assert all(p in nav for p in reference.PAGES)
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_no_reference_points_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [
        f for f in tracked if f.endswith((".py", ".md", ".toml", ".sh", ".yml")) and (ROOT / f).is_file()
    ]
    files += [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")]
    for name in files:
        text = (ROOT / name).read_text(errors="replace")
        assert "DESIGN.md" not in text or name == "tests/test_docs.py", f"{name} points at DESIGN.md"
        if name.endswith(".md"):  # relative Markdown links resolve to files that exist
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if not re.match(r"[a-z]+://|mailto:", target):
                    path = ((ROOT / name).parent / target).resolve()
                    generated = path.is_relative_to(ROOT / "docs") and (
                        path.relative_to(ROOT / "docs").as_posix() in reference.PAGES
                    )
                    assert path.exists() or generated, f"{name}: link to {target}"
