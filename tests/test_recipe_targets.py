"""bench/recipe_targets.py's cells: a stopped PG run continues from its checkpoint."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import recipe_targets  # noqa: E402
from pgprune import run_folder  # noqa: E402
from pgprune.errors import CheckpointError  # noqa: E402


@pytest.fixture
def fake_runs(monkeypatch):
    """prune() and the scoring replaced: records how prune was asked to run; refuses a resume when told."""
    calls, refuse = [], []

    def prune(settings, folder, **kwargs):
        calls.append(kwargs)
        if kwargs.get("resume") and refuse:
            raise CheckpointError("the run was started with different settings")
        Path(folder).mkdir(exist_ok=True)
        (Path(folder) / run_folder.RUN_FILE).write_text("{}")
        run_folder.rewrite_metrics(Path(folder), [{"step": 0, "hard_ppl": 9.0}, {"step": 1, "loss": 2.0},
                                                  {"step": 2, "loss": 1.9, "hard_ppl": 7.5}])
        return {"settings": settings.to_dict(), "masks": {"sparsity": 0.3},
                "pg": {"seconds": 1.0, "selected_step": 2}, "start_choice": {"chosen": "flap (global)"}}

    monkeypatch.setattr("pgprune.pruning.prune", prune)
    monkeypatch.setattr(recipe_targets, "score", lambda path, args: {"wikitext2": float(args.wikitext_tokens)})
    return calls, refuse


ARGS = argparse.Namespace(model="smollm2-135m", data_dir=None, progress_tokens=4096, dtype="auto", device=None,
                          quiet=True, wikitext_tokens=1, natural_tokens=1)


def run_cell(label, folder, args=ARGS):
    """One cell of the default recipe, as bench/recipe_targets.py's main runs it."""
    return recipe_targets.run_cell(label, recipe_targets.cell_settings("features", {}, args), folder, args)


def test_a_stopped_pg_cell_resumes_and_a_new_one_starts(tmp_path, fake_runs):
    calls, _ = fake_runs
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / run_folder.CHECKPOINT_FILE).write_bytes(b"checkpoint")
    assert run_cell("stopped", stopped)["resumed"] is True
    assert calls[-1]["resume"] is True
    fresh = tmp_path / "fresh"
    assert run_cell("fresh", fresh)["resumed"] is False
    assert not calls[-1].get("resume") and calls[-1]["overwrite"] is True
    # a finished cell is read back, not run again
    assert run_cell("fresh", fresh)["scores"] == {"wikitext2": 1.0}
    assert len(calls) == 2
    # scored under another protocol (more WikiText-2 tokens): scored again, not pruned again, and kept so
    longer = argparse.Namespace(**{**vars(ARGS), "wikitext_tokens": 2})
    assert run_cell("fresh", fresh, longer)["scores"] == {"wikitext2": 2.0}
    cell = run_cell("fresh", fresh, longer)
    assert cell["protocol"] == recipe_targets.protocol(longer)
    assert json.loads((fresh / "scores.json").read_text())["scores"] == {"wikitext2": 2.0}
    assert len(calls) == 2
    # unless it was run with other settings (here another dtype): then it runs again
    other = argparse.Namespace(**{**vars(ARGS), "dtype": "fp32"})
    assert run_cell("fresh", fresh, other)["settings"]["execution"]["dtype"] == "fp32"
    assert len(calls) == 3


def test_a_pg_cell_keeps_its_tracking_curve_selected_step_and_start_choice(tmp_path, fake_runs):
    cell = run_cell("pg", tmp_path / "pg")
    assert cell["tracking"] == [[0, 9.0], [2, 7.5]]
    assert cell["selected_step"] == 2 and cell["start_choice"] == {"chosen": "flap (global)"}
    # and so does the cell read back from scores.json
    assert run_cell("pg", tmp_path / "pg")["tracking"] == [[0, 9.0], [2, 7.5]]


def test_a_cell_is_the_same_run_whatever_it_did_not_depend_on():
    from pgprune.config import RunSettings

    wanted = RunSettings.from_recipe("features", {"method": "wanda-sp", "seed": 2})
    stored = wanted.to_dict()
    stored["pg"]["select"] = "final"  # a metric method has no PG loop
    stored["reconstruct_inputs"] = "sequential"  # what `auto` resolves to for channel / head masks
    del stored["pg"]["offsets"]  # an option added after the cell ran: its default
    assert recipe_targets.same_run(stored, wanted)
    pg = RunSettings.from_recipe("features", {"seed": 2})
    stored_pg = pg.to_dict()
    stored_pg["pg"]["select"] = "final"
    assert not recipe_targets.same_run(stored_pg, pg)  # but PG's own settings count for a PG cell
    layers = RunSettings.from_recipe("features", {"method": "block-influence", "units": "layer"})
    stored_layers = layers.to_dict()
    stored_layers["reconstruct_inputs"] = "sequential"  # `auto` is dense for layer-only masks
    assert not recipe_targets.same_run(stored_layers, layers)
    assert not recipe_targets.same_run({**stored, "no_such_option": 1}, wanted)
    # `auto` allocations count as what they resolve to: FLAP's global widths, none for --init auto
    flap = RunSettings.from_recipe("features", {"method": "flap"})
    assert recipe_targets.same_run({**flap.to_dict(), "allocation": "global"}, flap)
    assert not recipe_targets.same_run({**flap.to_dict(), "allocation": "uniform"}, flap)
    # `auto` layers where layers cannot go first remove none: the run of a 0 stored before auto was the default
    fine = RunSettings.from_recipe("features", {"units": "channel,head"})
    assert recipe_targets.same_run({**fine.to_dict(), "remove_layers": 0}, fine)
    assert not recipe_targets.same_run({**flap.to_dict(), "remove_layers": 0}, flap)
    auto_start = RunSettings.from_recipe("features", {"pg.init": "auto"})
    assert recipe_targets.same_run({**auto_start.to_dict(), "allocation": "uniform"}, auto_start)
    for changed in ({"seed": 3}, {"execution": {**stored["execution"], "dtype": "bf16"}}):
        assert not recipe_targets.same_run({**stored, **changed}, wanted)


def test_a_checkpoint_of_other_settings_starts_the_cell_again(tmp_path, fake_runs):
    calls, refuse = fake_runs
    refuse.append(True)
    folder = tmp_path / "changed"
    folder.mkdir()
    (folder / run_folder.CHECKPOINT_FILE).write_bytes(b"checkpoint")
    cell = run_cell("changed", folder)
    assert [bool(c.get("resume")) for c in calls] == [True, False] and cell["resumed"] is False


def test_one_seed_alone_and_earlier_cells_join_the_summary(tmp_path):
    assert recipe_targets.parse_calibs("wiki-sample:2,c4@1") == [("wiki-sample", 0), ("wiki-sample", 1), ("c4", 1)]
    record = {"model": "m", "protocol": {"seqlen": 128}}
    cell = {"label": "features", "calib": "wiki-sample", "seed": 0, "sparsity_target": 0.3,
            "settings": {"method": "pg"}, "scores": {"wikitext2": 10.0, "natural": 5.0}}
    earlier = tmp_path / "seed0.json"
    earlier.write_text(json.dumps(dict(record, cells=[cell])))
    merged = recipe_targets.merged_cells([str(earlier)], record)
    assert merged == [dict(cell, merged_from="seed0.json")]
    new = dict(cell, seed=1, scores={"wikitext2": 20.0, "natural": 7.0})
    (row,) = recipe_targets.summarize(merged + [new])
    assert row["seeds"] == 2 and row["wikitext2"] == 15.0 and row["wt2_max"] == 20.0
    # a PG variant is compared with the best metric method, not with another PG variant (merged or not)
    other_pg = dict(cell, label="features+pg.select=final", scores={"wikitext2": 8.0, "natural": 4.0})
    metric = dict(cell, label="flap+lsq", settings={"method": "flap"}, scores={"wikitext2": 30.0, "natural": 10.0})
    rows = {r["run"]: r for r in recipe_targets.summarize(merged + [new, other_pg, metric])}
    assert rows["features"]["wt2_best_metric"] == "flap+lsq" and rows["features"]["wt2_vs_best"] == 0.5
    assert rows["features+pg.select=final"]["nat_vs_best"] == 0.4 and "wt2_vs_best" not in rows["flap+lsq"]
    with pytest.raises(SystemExit, match="protocol differs"):
        recipe_targets.merged_cells([str(earlier)], dict(record, protocol={"seqlen": 256}))


def test_score_only_scores_saved_models_under_the_protocol(tmp_path, fake_runs, monkeypatch):
    calls, _ = fake_runs
    monkeypatch.setattr(recipe_targets, "RESULTS_DIR", tmp_path)
    assert recipe_targets.main(["--score", "a=dir_a,b=dir_b", "--wikitext-tokens", "3", "--work", str(tmp_path / "w"),
                                "--tag", "scored"]) == 0
    record = json.loads((tmp_path / "scored.json").read_text())
    assert [r["name"] for r in record["scored"]] == ["a", "b"] and record["scored"][1]["model"] == "dir_b"
    assert record["scored"][0]["scores"] == {"wikitext2": 3.0} and record["protocol"]["wikitext2"]["max_tokens"] == 3
    assert calls == [] and not record["cells"]  # nothing pruned
    assert (tmp_path / "w" / "dense_smollm2-135m_fp32_wt3_nat32768.json").is_file()
