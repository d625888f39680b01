"""Run reports: a real tiny prune pipeline (policy gradient and a metric method) end to end, then
report.md / report.json / PNG plots checked against the run folder's own files."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

pytest.importorskip("matplotlib", reason="reports need matplotlib: pip install 'pgprune[plot]'")

from matplotlib.image import imread  # noqa: E402

from pgprune.cli import main  # noqa: E402
from pgprune.errors import CheckpointError  # noqa: E402
from pgprune.masks import Masks  # noqa: E402
from pgprune.models.synthetic import synthetic_model  # noqa: E402
from pgprune.pruning import prune  # noqa: E402
from pgprune.report import write_report  # noqa: E402

from conftest import char_tokenizer, run_settings  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("dense", "init", "gated", "pruned")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    synthetic_model("llama").save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n\n" * 30)
    return root, text


@pytest.fixture(scope="module")
def pg_run(workdir):
    root, text = workdir
    out = root / "run_pg"
    prune(run_settings(forward="gated", model=str(root / "model"), method="pg", init="magnitude", steps=6, eval_every=2,
                       select="final", units="channel,head", sparsity=0.2, calib=f"text:{text}", eval=f"text:{text}",
                       nsamples=16, seqlen=32, eval_seqlen=32, eval_max_tokens=None, track_max_tokens=256,
                       batch_size=4, dtype="fp32", device="cpu"), out, progress=False)
    return out, write_report(out)


@pytest.fixture(scope="module")
def metric_run(workdir):
    """A magnitude run through the CLI with --report (the report is written at the end)."""
    root, text = workdir
    out = root / "run_magnitude"
    rc = main(["prune", str(root / "model"), "--method", "magnitude", "--sparsity", "0.3", "--calib", f"text:{text}",
               "--nsamples", "16", "--seqlen", "32", "--eval", f"text:{text}", "--eval-max-tokens", "0",
               "--dtype", "fp32", "--device", "cpu", "--out", str(out), "--report"])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01, f"{path.name} is blank"
    return img


def table_rows(md: str) -> dict[str, list[str]]:
    """Rows of the markdown perplexity table: {stage: [cells]}."""
    rows = {}
    section = md.split("## Perplexity", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in STAGES:
            rows[cells[0]] = cells[1:]
    return rows


def test_pg_report_markdown_mentions_sparsity_and_every_stage(pg_run):
    out, rep = pg_run
    run = json.loads((out / "run.json").read_text())
    md = (out / "report.md").read_text()
    assert f"{run['masks']['sparsity']:.2%} of prunable parameters" in md
    assert f"{run['masks']['total_sparsity']:.2%} of all parameters" in md
    assert f"seqlen {run['settings']['eval']['seqlen']}" in md and "all tokens" in md
    rows = table_rows(md)
    assert set(rows) == set(STAGES) == set(run["perplexity"])
    for stage, values in run["perplexity"].items():
        assert rows[stage] == [f"{v:.3f}" for v in values.values()]
    assert "skipped steps** (NaN/inf loss, no update): 0" in md
    for plot in rep["plots"].values():
        assert f"]({plot['file']})" in md
    assert rep["skipped_plots"] == {}
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def test_pg_report_json_matches_the_run_files(pg_run):
    out, rep = pg_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    run = json.loads((out / "run.json").read_text())
    masks = Masks.load(out / "masks.safetensors")
    # channel,head only and no layer removed: kept units per layer are plain row sums of the mask file
    assert rep["layers"]["kv_heads"] == masks["head"].sum(-1).tolist()
    assert rep["layers"]["channels"] == masks["channel"].sum(-1).tolist()
    assert rep["layers"]["dense_kv_heads"] == [run["model"]["num_kv_heads"]] * run["model"]["num_layers"]
    assert rep["sparsity"]["prunable"] == run["masks"]["sparsity"]
    assert rep["export_check"]["ok"] is True
    assert rep["export_check"]["prunable_params"] == run["masks"]["kept_prunable_params"]

    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pg = rep["pg"]
    assert pg["steps_logged"] == run["settings"]["pg"]["steps"] == 6
    assert pg["forward_passes"] == 6 * run["settings"]["pg"]["k"]
    assert pg["skipped_steps"] == 0
    tracked = [r["hard_ppl"] for r in log if "hard_ppl" in r]
    assert len(tracked) == 1 + 6 // 2  # step 0, then every eval_every steps
    assert pg["hard_ppl_start"] == tracked[0] and pg["hard_ppl_final"] == tracked[-1]
    assert pg["hard_ppl_best"] == min(tracked)


def test_pg_plots_are_valid_pngs_with_the_expected_panels(pg_run):
    out, rep = pg_run
    plots = rep["plots"]
    assert set(plots) == {"structure", "probabilities", "training"}
    for plot in plots.values():
        read_png(out / plot["file"])
    assert plots["structure"]["axes"] == ["Kept KV heads per layer", "Kept MLP channels per layer"]
    assert plots["probabilities"]["axes"] == ["Final keep-probabilities: MLP channels",
                                              "Final keep-probabilities: KV-head groups"]
    assert plots["training"]["axes"][:2] == ["Loss and baseline vs forward passes",
                                            "Hard-mask perplexity vs forward passes"]
    assert plots["training"]["yscales"][1] == "log"

    # the histograms hold every unit once, split by what the final model keeps
    masks = Masks.load(out / "masks.safetensors")
    probs = torch.load(out / "probabilities.pt", weights_only=True)
    run = json.loads((out / "run.json").read_text())
    units = plots["probabilities"]["units"]
    assert set(units) == set(probs) == {"channel", "head"}
    assert units["head"]["kept"] == sum(run["masks"]["kv_heads_per_layer"]) == int(masks["head"].sum())
    assert units["channel"]["kept"] == sum(run["masks"]["channels_per_layer"]) == int(masks["channel"].sum())
    for kind, n in units.items():
        assert n["kept"] + n["removed"] == probs[kind].numel()
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pts = plots["training"]["points"]
    assert pts["loss"] == sum("loss" in r for r in log) == 6
    assert pts["hard_ppl"] == sum("hard_ppl" in r for r in log)


def test_metric_run_report_has_no_pg_plots(metric_run):
    out, rep = metric_run
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["method"] == "magnitude" and rep["pg"] is None
    assert set(rep["plots"]) == {"structure"}
    read_png(out / "structure.png")
    assert not (out / "probabilities.png").exists() and not (out / "training.png").exists()
    assert set(rep["skipped_plots"]) == {"probabilities", "training"}
    md = (out / "report.md").read_text()
    assert "no probabilities plot" in md and "no training plot" in md
    assert "## Policy gradient" not in md
    assert f"{run['masks']['sparsity']:.2%} of prunable parameters" in md
    assert set(table_rows(md)) == set(run["perplexity"]) == {"dense", "gated", "pruned"}


def test_report_command_prints_a_summary(metric_run, capsys):
    out, _ = metric_run
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "report.md" in text and "structure.png" in text and "no training plot" in text
    assert (out / "report.md").is_file()


def test_missing_run_json_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"no run\.json.*pgprune prune"):
        write_report(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="--resume"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "pgprune report: error:" in err and "does not exist" in err
    assert not list(tmp_path.glob("report.*"))


def test_damaged_log_skipped_steps_and_nan_perplexity(pg_run, tmp_path):
    src, _ = pg_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    run = json.loads((out / "run.json").read_text())
    name = next(iter(run["perplexity"]["gated"]))
    run["perplexity"]["gated"][name] = math.nan
    for values in run["perplexity"].values():  # a capped dataset: the table must say so
        values["c4"] = values[name]
    run["pg"]["skipped_steps"] = 1
    run["pg"]["resumed_at"] = 4
    (out / "run.json").write_text(json.dumps(run))
    with open(out / "metrics.jsonl", "a") as f:
        skipped = {"step": 7, "forward_passes": 14, "lr": 0.0, "skipped": True, "losses": [None, None]}
        f.write(json.dumps(skipped) + "\n")
        f.write('{"step": 8, "forward_pa')  # a run killed mid-append
    rep = write_report(out, inspect_export=False)
    md = (out / "report.md").read_text()
    assert rep["pg"]["skipped_in_log"] == [7] and rep["pg"]["unreadable_log_lines"] == 1
    assert "1 unreadable line(s)" in md and "(steps [7])" in md
    assert rep["pg"]["resumed_at"] == 4 and "resumed at PG step 4" in md
    assert re.search(r"^\| gated \| nan \| nan \|$", md, re.M)
    from pgprune.data import SOURCES

    assert f"`c4`: at most its recipe's {SOURCES['c4'].eval_max_windows} windows" in md
    assert rep["perplexity_protocol"]["window_caps"] == {"c4": SOURCES["c4"].eval_max_windows}
    assert rep["plots"]["training"]["points"]["skipped"] == 1
    read_png(out / "training.png")


def test_units_of_a_removed_layer_count_as_removed(workdir):
    root, text = workdir
    out = root / "run_pg_layers"
    prune(run_settings(forward="gated", model=str(root / "model"), method="pg", init="magnitude", allocation="global", steps=2,
                       eval_every=2, units="channel,head,layer", sparsity=0.35, calib=f"text:{text}",
                       eval=f"text:{text}", nsamples=16, seqlen=32, eval_seqlen=32, eval_max_tokens=256,
                       track_max_tokens=256, batch_size=4, dtype="fp32", device="cpu"), out, progress=False)
    rep = write_report(out)
    run = json.loads((out / "run.json").read_text())
    assert run["masks"]["layers_kept"] < run["model"]["num_layers"], "the budget should remove a whole layer"
    units = rep["plots"]["probabilities"]["units"]
    raw = Masks.load(out / "masks.safetensors")
    assert units["layer"]["kept"] == run["masks"]["layers_kept"]
    assert units["channel"]["kept"] == sum(run["masks"]["channels_per_layer"]) < int(raw["channel"].sum())
    assert units["head"]["kept"] == sum(run["masks"]["kv_heads_per_layer"])
    assert 0 in rep["layers"]["kv_heads"] and rep["export_check"]["ok"] is True
    read_png(out / "probabilities.png")
    read_png(out / "structure.png")


def test_report_shows_the_pg_settings_and_the_selected_step(pg_run):
    out, rep = pg_run
    run = json.loads((out / "run.json").read_text())
    md = (out / "report.md").read_text()
    pg = rep["pg"]
    assert (pg["policy"], pg["estimator"], pg["reconstruct"], pg["select"], pg["forward"]) == \
        ("units", "paper", "none", "final", "gated")
    assert pg["selected_step"] == run["pg"]["selected_step"] == 6
    assert run["pg"]["resumed_at"] is None and "resumed at" not in md  # a run in one go
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert pg["hard_ppl_selected"] == next(r["hard_ppl"] for r in log if r["step"] == 6)
    for label, value in (("policy", "units"), ("masks scored with reconstruction", "none"), ("estimator", "paper"),
                         ("selection", "final"), ("selected step (exported mask)", "6"), ("forward", "gated")):
        assert f"| {label} | {value} |" in md


def test_report_shows_which_start_init_auto_chose(workdir):
    root, text = workdir
    out = root / "run_pg_auto"
    prune(run_settings(forward="gated", model=str(root / "model"), method="pg", init="auto", steps=2, eval_every=2,
                       units="channel,head", sparsity=0.2, calib=f"text:{text}", eval=f"text:{text}", nsamples=16,
                       seqlen=32, eval_seqlen=32, eval_max_tokens=256, track_max_tokens=256, batch_size=4,
                       dtype="fp32", device="cpu"), out, progress=False)
    rep = write_report(out)
    choice = json.loads((out / "run.json").read_text())["start_choice"]
    assert rep["start_choice"] == choice
    line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("- **Start**"))
    assert choice["chosen"] in line and all(f"{label} " in line for label in choice["candidates"])


def test_report_shows_the_layer_count_and_the_start_at_that_count(workdir):
    root, text = workdir
    out = root / "run_pg_auto_layers"
    prune(run_settings(forward="gated", model=str(root / "model"), method="pg", init="auto", steps=2, eval_every=2,
                       units="channel,head,layer", remove_layers="auto", sparsity=0.5, calib=f"text:{text}",
                       eval=f"text:{text}", nsamples=16, seqlen=32, eval_seqlen=32, eval_max_tokens=256,
                       track_max_tokens=256, batch_size=4, dtype="fp32", device="cpu"), out, progress=False)
    write_report(out)
    layers = json.loads((out / "run.json").read_text())["start_choice"]["remove_layers"]
    lines = (out / "report.md").read_text().splitlines()
    line = next(x for x in lines if x.startswith("- **Layers first**"))
    assert f"by count of {layers['swept']}: " in line and all(f"{n} " in line for n in layers["candidates"])
    starts = [x for x in lines if x.startswith("  - every start with")]
    assert len(starts) == (1 if layers["chosen"] else 0)
    assert all(f"{label} " in starts[0] for label in layers["starts"]) if starts else True


@pytest.mark.parametrize("reconstruct", ["bias", "lsq"])
def test_export_check_counts_the_compensation_biases(workdir, reconstruct):
    # a compensated (or refit) run exports a bias vector per refit block: the check must expect them
    root, text = workdir
    out = root / f"run_pg_{reconstruct}"
    prune(run_settings(forward="gated", model=str(root / "model"), method="pg", init="magnitude", steps=2,
                       eval_every=2, units="channel,head", sparsity=0.3, calib=f"text:{text}", eval=f"text:{text}",
                       nsamples=16, seqlen=32, eval_seqlen=32, eval_max_tokens=256, track_max_tokens=256,
                       batch_size=4, dtype="fp32", device="cpu", pg_reconstruct="bias", reconstruct=reconstruct), out,
          progress=False)
    rep = write_report(out)
    assert f"- **Reconstruction**: {reconstruct}" in (out / "report.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["bias_params_added"] > 0
    assert rep["export_check"]["ok"] is True, rep["export_check"]["problems"]
    assert rep["export_check"]["prunable_params"] == run["masks"]["kept_prunable_params"] + run["bias_params_added"]


def test_natural_text_column_when_c4_and_the_wikipedia_sample_are_evaluated(metric_run, tmp_path):
    src, _ = metric_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    run = json.loads((out / "run.json").read_text())
    for values in run["perplexity"].values():
        values.update({"c4": 40.0, "wiki-sample": 90.0})
    (out / "run.json").write_text(json.dumps(run))
    rep = write_report(out, inspect_export=False)
    md = (out / "report.md").read_text()
    assert rep["natural_text"]["pruned"] == pytest.approx(60.0)  # sqrt(40 * 90)
    assert "| natural text |" in md and re.search(r"^\| pruned \|.* \| 60\.0+ \|$", md, re.M)
    # without both sets there is no such column
    rep = write_report(src, inspect_export=False)
    assert set(rep["natural_text"].values()) == {None} and "natural text" not in (src / "report.md").read_text()
