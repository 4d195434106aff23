"""Question provenance: id digests, training records, overlap; FAIR_REQUIRE_DATA."""

from __future__ import annotations

import pytest

from fairdistill.engine.fair.splits import (
    find_training_record,
    ids_digest,
    overlaps,
    training_record,
    write_training_record,
)
from fairdistill.engine.rundir.schema import Problem, Sample
from tests.conftest import missing_data


def test_ids_digest_is_order_and_duplicate_free():
    assert ids_digest(["b", "a", "a"]) == ids_digest(["a", "b"]) != ids_digest(["a", "b", "c"])


def test_training_record_and_overlap(tmp_path):
    samples = [
        Sample(id=f"{pid}/s/{t}", problem_id=pid, task=t, messages=[], response="", teacher="x")
        for pid in ("svamp-chal-1", "svamp-chal-2")
        for t in ("rationale", "mistake")
    ]
    record = training_record([tmp_path], samples)  # a folder without manifest: digests unknown
    assert record["problem_ids"] == ["svamp-chal-1", "svamp-chal-2"]
    assert record["runs"][0]["dataset"] is None
    (tmp_path / "adapter").mkdir()
    write_training_record(tmp_path / "adapter", record)
    assert find_training_record(tmp_path / "adapter") == record
    assert find_training_record(tmp_path / "adapter" / "nothing") == record  # the parent's
    probs = [
        Problem(id=f"svamp-chal-{i}", question="?", answer="1", task="numeric", dataset="svamp")
        for i in (2, 3)
    ]
    assert overlaps(record, probs, "test") == {"svamp/test": ["svamp-chal-2"]}
    assert overlaps(record, probs[1:], "test") == {}


def test_missing_data_skips_or_fails(monkeypatch):
    monkeypatch.delenv("FAIR_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent"):
        missing_data("x absent")
    monkeypatch.setenv("FAIR_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="FAIR_REQUIRE_DATA=1 but x absent"):
        missing_data("x absent")
