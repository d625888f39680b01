"""bench/zeroshot.py: a comparison of several models is written after each one and goes on where an
interrupted run stopped, reusing only records made under the same settings."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import zeroshot  # noqa: E402


@pytest.fixture
def fake_eval(monkeypatch, tmp_path):
    """evaluate_one replaced (records which models it was asked for); results go to tmp_path."""
    asked = []

    def evaluate_one(name, args, limit):
        asked.append(name)
        if name == "boom":
            raise RuntimeError("interrupted")
        return {"model": name, "extra": {"dtype": args.dtype},
                "zeroshot": {"requested": zeroshot.parse_tasks(args.tasks), "limit": limit,
                             "batch_size": args.batch_size, "average": {"value": 0.5, "tasks": ["piqa"]}, "tasks": {}}}

    monkeypatch.setattr(zeroshot, "evaluate_one", evaluate_one)
    monkeypatch.setattr(zeroshot, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr("_common.RESULTS_DIR", tmp_path)
    monkeypatch.setattr(zeroshot, "comparison_table", lambda records: "")
    return asked


def run(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["zeroshot.py", "--name", "cmp", "--tasks", "piqa", *argv])
    zeroshot.main()


def test_an_interrupted_comparison_goes_on_where_it_stopped(monkeypatch, tmp_path, fake_eval):
    with pytest.raises(RuntimeError):
        run(monkeypatch, "--model", "a", "--model", "boom", "--limit", "5")
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert list(saved["models"]) == ["a"] and saved["complete"] is False  # written after the first model
    fake_eval.clear()
    run(monkeypatch, "--model", "a", "--model", "b", "--limit", "5")
    assert fake_eval == ["b"]  # a reused
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert list(saved["models"]) == ["a", "b"] and saved["complete"] is True
    fake_eval.clear()
    run(monkeypatch, "--model", "a", "--model", "b", "--limit", "6")  # other settings: nothing reused
    assert fake_eval == ["a", "b"]
    fake_eval.clear()
    run(monkeypatch, "--model", "a", "--model", "b", "--limit", "6", "--dtype", "bf16")
    assert fake_eval == ["a", "b"]
