"""Config validation: every error names the file and the field; shipped examples validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdistill.engine.config import load_config
from fairdistill.engine.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.toml"))

BASE = """
[student]
endpoint = "s"
[teachers]
endpoints = ["a", "b"]
[endpoints.s]
base_url = "http://127.0.0.1:1/v1"
model = "m"
[endpoints.a]
base_url = "http://127.0.0.1:1/v1"
model = "m"
[endpoints.b]
base_url = "http://127.0.0.1:1/v1"
model = "m"
"""


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.student.endpoint in cfg.endpoints
    assert len(cfg.teachers.endpoints) >= 2


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("[review]\nthreshold = 'high'\n", "review.threshold"),
        ("[review]\ngold_chek = 'reject'\n", "gold_chek"),
        ("[endpoints.c]\nbase_url = 'http://h'\nmodel = 'm'\nrpm = -5\n", "endpoints.c: Expected `float`"),
        ("[endpoints.c]\nbase_url = 'x'\nmodel = 'm'\n", "endpoints.c: Expected an http:// or https:// URL"),
        ("[endpoints.c]\nmodel = 'm'\n", "endpoints.c: Object missing required field `base_url`"),
        ("[samples]\npolicy = 'some'\n", "samples.policy"),
    ],
)
def test_bad_values_name_the_field(tmp_path, extra, needle):
    path = tmp_path / "job.toml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_unknown_teacher_and_single_teacher_are_rejected(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(BASE.replace('endpoints = ["a", "b"]', 'endpoints = ["a", "zz"]'))
    with pytest.raises(ConfigError, match="'zz' is not in"):
        load_config(path)
    path.write_text(BASE.replace('endpoints = ["a", "b"]', 'endpoints = ["a"]'))
    with pytest.raises(ConfigError, match="at least 2 teachers"):
        load_config(path)


def test_broken_toml_names_the_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[run\nseed = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
