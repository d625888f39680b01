"""bench/start_scores.py: a finished run's auto start scored again reproduces what the run's search scored."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import start_scores  # noqa: E402
from pgprune.pruning import prune  # noqa: E402

from conftest import tiny_run_settings, tiny_workdir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """A finished tiny PG run with --init auto --remove-layers auto (its search removes one layer): (root, folder)."""
    root, text = tiny_workdir(tmp_path_factory, "start-scores")
    out = root / "run"
    prune(tiny_run_settings(root, text, policy="features", init="auto", init_scale=4.0, steps=1, sparsity=0.5,
                            units="channel,head,layer", remove_layers="auto", pg_reconstruct="bias", reconstruct="lsq",
                            track_max_tokens=10**6), out, progress=False)
    return root, out


def test_every_start_scored_again_matches_the_runs_own_search(auto_run, monkeypatch):
    root, out = auto_run
    choice = json.loads((out / "run.json").read_text())["start_choice"]
    assert choice["remove_layers"]["chosen"] == 1  # one layer goes: the starts scored again at a count > 0
    monkeypatch.setattr(start_scores, "RESULTS_DIR", root)
    counts = (choice["remove_layers"]["chosen"], 0)
    start_scores.main([str(out), "--counts", ",".join(map(str, counts)), "--tag", "scores", "--quiet"])
    rows = json.loads((root / "scores.json").read_text())["rows"]
    assert [(r["start"], r["layers_first"]) for r in rows] == [(s, n) for s in choice["candidates"] for n in counts]
    for row in rows:
        assert row["layers_first"] == len(row["layers"])
        assert row["stored"] is not None and row["heldout"] == pytest.approx(row["stored"], rel=1e-4)
    assert {r["start"]: r["stored"] for r in rows if r["layers_first"] == 0} == choice["candidates"]


def test_layer_swaps_score_the_sets_one_swap_from_block_influence(auto_run, monkeypatch):
    """--swaps K: each removed layer kept in turn instead of one of the K kept layers of lowest influence."""
    import torch

    assert start_scores.layer_swaps(torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3]), [1, 3], 2) == [
        (1, 4), (1, 2), (3, 4), (3, 2)]
    root, out = auto_run
    monkeypatch.setattr(start_scores, "RESULTS_DIR", root)
    start_scores.main([str(out), "--methods", "obs", "--swaps", "2", "--tag", "swaps", "--quiet"])
    start, *swaps = json.loads((root / "swaps.json").read_text())["rows"]
    removed = start["layers"]
    assert len(removed) == 1 and len(swaps) == 2
    for row in swaps:
        restored, dropped = (int(w.split()[0]) for w in row["start"].split(", ")[1:])
        assert restored == removed[0] and row["layers"] == [dropped] != removed
        assert row["heldout"] > 0 and row["heldout"] != start["heldout"]  # another mask, another score
