"""Atomic result files and the per-inputs JSON cache."""

import json

import pytest

from mxmoe.files import cached_json, write_json_atomic


def test_cached_json_computes_once_per_params(tmp_path):
    path = tmp_path / "eval" / "x.json"
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    first = cached_json(path, {"windows": 4}, compute)
    assert first == {"params": {"windows": 4}, "value": 1} and json.loads(path.read_text()) == first
    assert cached_json(path, {"windows": 4}, compute) == first and len(calls) == 1
    assert cached_json(path, {"windows": 8}, compute)["value"] == 2  # other inputs: measured again


def test_failed_compute_keeps_the_old_document(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"params": {"windows": 4}, "value": 1})

    def broken():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_json(path, {"windows": 8}, broken)
    assert json.loads(path.read_text())["value"] == 1 and [p.name for p in tmp_path.iterdir()] == ["x.json"]
