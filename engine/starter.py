"""``fair init``: write a commented starter config for ``fair run``.

``--sim`` (the default) gives the simulator's committee (three teachers and a student behind
``fair sim --profile committee``), which runs as is; ``--providers openai,anthropic,gemini`` gives
real teachers with current model names and a local vLLM student. Every table and field of the
config is written with its description (``engine.confdoc``, the same text as the reference
pages); fields the starter does not set appear commented out with their defaults. The text is
validated like any config before it is written, so a starter always loads.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine import confdoc
from fairdistill.engine.config import RunConfig, convert_config
from fairdistill.engine.errors import UsageError


@dataclass(frozen=True)
class Model:
    """A provider model the starter offers, with its list prices ($ per 1M tokens)."""

    name: str
    price_in: float
    price_out: float


@dataclass(frozen=True)
class Provider:
    provider: str
    base_url: str
    key_env: str
    models: tuple[Model, Model]  # the second is used when this provider is the only one


PROVIDERS = {
    "openai": Provider(
        "openai", "https://api.openai.com/v1", "OPENAI_API_KEY",
        (Model("gpt-5-mini", 0.25, 2.00), Model("gpt-4.1-mini", 0.40, 1.60)),
    ),
    "anthropic": Provider(
        "anthropic", "https://api.anthropic.com/v1", "ANTHROPIC_API_KEY",
        (Model("claude-haiku-4-5", 1.00, 5.00), Model("claude-sonnet-4-5", 3.00, 15.00)),
    ),
    "gemini": Provider(
        "gemini", "https://generativelanguage.googleapis.com/v1beta", "GEMINI_API_KEY",
        (Model("gemini-2.5-flash", 0.30, 2.50), Model("gemini-2.5-flash-lite", 0.10, 0.40)),
    ),
}  # fmt: skip

# the simulator's committee profile: model -> (price in, price out), as in examples/sim-gsm8k.toml
SIM_TEACHERS = {"gpt-sim": (0.15, 0.60), "claude-sim": (0.80, 4.00), "gemini-sim": (0.10, 0.40)}


def sim_values(port: int) -> dict[str, Any]:
    """The values a simulator starter sets: 20 built-in problems, three teachers, one student."""
    url = f"http://127.0.0.1:{port}/v1"
    endpoints: dict[str, Any] = {"student": {"base_url": url, "model": "student-sim"}}
    for name, (p_in, p_out) in SIM_TEACHERS.items():
        endpoints[name] = {"base_url": url, "model": name, "price_in": p_in, "price_out": p_out}
    endpoints["claude-sim"]["timeout_s"] = 20.0  # its rare injected hangs are retried after 20 s
    return {
        "dataset": {"name": "builtin", "limit": 20},
        "student": {"endpoint": "student", "attempts": 2, "temperature": 0.7},
        "teachers": {"endpoints": list(SIM_TEACHERS)},
        "endpoints": endpoints,
    }


def provider_values(names: list[str]) -> dict[str, Any]:
    """Real teachers (two models of one provider when only one is named) and a vLLM student."""
    picked = [(n, PROVIDERS[n].models[0]) for n in names]
    if len(picked) == 1:
        picked.append((names[0], PROVIDERS[names[0]].models[1]))
    endpoints: dict[str, Any] = {
        "student": {"base_url": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen2.5-0.5B-Instruct"}
    }
    for provider, model in picked:
        p = PROVIDERS[provider]
        endpoints[model.name] = {
            "provider": p.provider, "base_url": p.base_url, "model": model.name,
            "api_key_env": p.key_env, "price_in": model.price_in, "price_out": model.price_out,
        }  # fmt: skip
    return {
        "dataset": {"name": "gsm8k", "split": "train", "limit": 100},
        "student": {"endpoint": "student"},
        "teachers": {"endpoints": [m.name for _, m in picked]},
        "run": {"max_cost_usd": 5.0},
        "endpoints": endpoints,
    }


def parse_providers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in PROVIDERS:
            raise UsageError(f"fair init: --providers: unknown provider {n!r} (have {', '.join(PROVIDERS)})")
    if not names or len(set(names)) != len(names):
        raise UsageError("fair init: --providers: a comma list of distinct providers, e.g. openai,gemini")
    return names


def render(values: dict[str, Any], header: str) -> str:
    """The starter's TOML text: ``header``, then every table with its fields described."""
    out = [header.rstrip(), ""]
    for table in confdoc.tables():
        if table.name.startswith("endpoints.NAME"):
            continue  # written per endpoint below
        out += _table(table, table.name, values.get(table.name, {}) if table.name else values)
    sub = [t for t in confdoc.tables() if t.name.startswith("endpoints.NAME")]
    for i, (name, given) in enumerate(values["endpoints"].items()):
        key = (
            name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else confdoc.toml_value(name)
        )  # "gemini-2.5-flash"
        out += _table(sub[0], f"endpoints.{key}", given, brief=i > 0)
        if i == 0:
            for t in sub[1:]:  # batch, accepts, ...: once, commented out
                out += _table(t, t.name.replace("NAME", key), {}, commented=True)
    return "\n".join(out).rstrip() + "\n"


def _table(
    table: confdoc.TableDoc, name: str, given: dict, *, brief: bool = False, commented: bool = False
) -> list[str]:
    lead = "# " if commented else ""
    lines = _comment(table.description) if name and not brief else []
    if name:
        lines.append(f"{lead}[{name}]")
    for f in table.fields:
        if (table.name, f.name) in confdoc.HIDDEN or (brief and f.name not in given):
            continue
        if not brief:
            where = ", ".join(x for x in (f.type, f.range) if x)
            lines += _comment(f"{f.description} ({where})")
        if f.name in given:
            lines.append(f"{lead}{f.name} = {confdoc.toml_value(given[f.name])}")
        else:
            lines.append(f"# {f.name} = {confdoc.toml_value(f.default)}")
    if brief:
        lines.append("# (the other fields as in the first endpoint above)")
    return [*lines, ""]


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, 98, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False)


SIM_HEADER = """\
# A FAIR job against the simulator (no API key, no GPU), written by `fair init --sim`.
# Start the simulator, then run this file:
#   fair sim --profile committee --dataset builtin --port {port} &
#   fair run {path} --run-dir runs/{stem}
# Every field is listed with its description; a commented-out line shows the default."""

PROVIDERS_HEADER = """\
# A FAIR job with real teachers ({names}), written by `fair init --providers`.
#   export {keys}=...
#   vllm serve Qwen/Qwen2.5-0.5B-Instruct --port 8000      # the student (or: fair serve-student)
#   fair run {path} --estimate                               # projected cost first
#   fair run {path} --run-dir runs/{stem}
# Keys are read from the environment variables named below and never written anywhere.
# Every field is listed with its description; a commented-out line shows the default."""


def starter(path: Path, *, providers: list[str] | None = None, port: int = 8900) -> str:
    """The starter text for ``path`` (checked to load as a ``RunConfig``)."""
    if providers:
        keys = "=... ".join(PROVIDERS[n].key_env for n in providers)
        header = PROVIDERS_HEADER.format(names=", ".join(providers), keys=keys, path=path, stem=path.stem)
        text = render(provider_values(providers), header)
    else:
        text = render(sim_values(port), SIM_HEADER.format(port=port, path=path, stem=path.stem))
    convert_config(msgspec.toml.decode(text), RunConfig, source=f"fair init: {path}")
    return text


def cli_main(args: Any) -> int:
    """``fair init [--sim | --providers LIST] [--port P] [--force] PATH``."""
    path = Path(args.path)
    providers = parse_providers(args.providers) if args.providers is not None else None
    if path.exists() and not args.force:
        raise UsageError(f"fair init: {path} exists (--force overwrites it)")
    if path.is_dir():
        raise UsageError(f"fair init: {path} is a directory; give a file name such as {path}/job.toml")
    if not path.parent.is_dir():
        raise UsageError(f"fair init: {path.parent} is not a directory")
    path.write_text(starter(path, providers=providers, port=args.port))
    how = (
        f"fair sim --profile committee --dataset builtin --port {args.port} &, then " if not providers else ""
    )
    print(f"fair: wrote {path}; next: {how}fair run {path}", flush=True)
    return 0
