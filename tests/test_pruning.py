"""The prune() pipeline end to end on a tiny model: budget, exactness of the exported model,
resume and bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.evaluate.perplexity import evaluate_perplexity
from pgprune.export import load_pruned
from pgprune.pruning import prune

from conftest import tiny_run_settings, tiny_workdir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_workdir(tmp_path_factory, "pruning")


# the paper recipe's policy (units, no compensation) on the gated forward, unless a test says otherwise
_options = tiny_run_settings


def test_pg_pipeline_exports_the_model_it_evaluated(workdir):
    root, text = workdir
    out = root / "pg"
    # track the whole (single-file) text, so step 0's hard-mask perplexity is comparable to "init"
    has_tb = importlib.util.find_spec("tensorboard") is not None
    record = prune(_options(root, text, track_max_tokens=10**6, tensorboard="" if has_tb else None), out,
                   progress=False)
    if has_tb:  # "" = the run folder's tensorboard/
        assert any(f.name.startswith("events.out.tfevents") for f in (out / "tensorboard").iterdir())
    assert abs(record["masks"]["sparsity"] - 0.25) < 0.03
    ppl = record["perplexity"]
    assert set(ppl) == {"dense", "init", "gated", "pruned"}
    name = f"text:{text}"
    # The gated model and the physically pruned one compute the same function.
    assert ppl["pruned"][name] == pytest.approx(ppl["gated"][name], rel=1e-4)
    # ... and so does the exported folder, reloaded.
    model, tok = load_pruned(out / "model", dtype="fp32", device="cpu")
    again = evaluate_perplexity(model, tok, name, seqlen=32).ppl
    assert again == pytest.approx(ppl["pruned"][name], rel=1e-4)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["pg"]["steps"] == 4 and run["pg"]["track"]["split"] == "heldout"
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    # The step-0 hard mask is the metric method's mask (DESIGN.md: start where the metric ends).
    assert log[0]["hard_ppl"] == pytest.approx(ppl["init"][name], rel=1e-6)


def test_a_run_reads_each_text_once(workdir, monkeypatch, tmp_path):
    # the check before loading reads the calibration / evaluation / tracking text; the run then
    # tokenises the same documents without reading the file again
    import pgprune.data as data

    root, text = workdir
    reads = []
    loader = data._load_text_file

    def counting(path):
        load = loader(path)
        return lambda split, root: reads.append(split) or load(split, root)

    monkeypatch.setattr(data, "_load_text_file", counting)
    prune(_options(root, text, steps=1), tmp_path / "once", progress=False)
    assert len(reads) == 1
    data.load_documents(f"text:{text}", "test")  # outside a run nothing is kept
    data.load_documents(f"text:{text}", "test")
    assert len(reads) == 3


def test_existing_folder_needs_resume_or_overwrite(workdir):
    root, text = workdir
    out = root / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ConfigError, match="--resume"):
        prune(_options(root, text), out, progress=False)


@pytest.mark.parametrize("method,reconstruct,units", [("magnitude", "none", "channel,head"),
                                                      ("flap", "bias", "channel,head"),
                                                      ("magnitude", "lsq", "channel,head"),
                                                      ("obs", "lsq", "channel,head"),
                                                      ("block-influence", "lsq", "layer")])
def test_metric_method_pipeline(workdir, method, reconstruct, units, tmp_path):
    root, text = workdir
    out = tmp_path / method
    record = prune(_options(root, text, method=method, sparsity=0.3, reconstruct=reconstruct, units=units), out,
                   progress=False)
    if units == "layer":  # removed layers regressed on the previous kept layer's MLP inputs
        assert record["reconstruction"]["removed_runs_regressed"]
    name = f"text:{text}"
    assert "init" not in record["perplexity"]
    # --allocation auto (the default): each method's own, recorded as what it resolved to
    assert record["metric"]["allocation"] == ("uniform" if method in ("magnitude", "obs") else "global")
    assert record["reconstruction"]["mode"] == reconstruct
    gated, pruned = record["perplexity"]["gated"][name], record["perplexity"]["pruned"][name]
    if reconstruct == "none":
        assert pruned == pytest.approx(gated, rel=1e-4)
    elif reconstruct == "bias":  # the biases exist only in the pruned model (whether a mean fill helps a
        assert pruned != pytest.approx(gated, rel=1e-3)  # random tiny model's perplexity is chance)
    else:  # the refit exists only in the pruned model, and a fit on this text helps on it
        assert pruned < gated
    if reconstruct == "lsq":  # the refit weights are exported: the reloaded model scores the same
        reloaded, tok = load_pruned(out / "model", dtype="fp32", device="cpu")
        again = evaluate_perplexity(reloaded, tok, name, seqlen=32).ppl
        assert again == pytest.approx(pruned, rel=1e-4)


def test_bad_sparsity(workdir):
    root, text = workdir
    with pytest.raises(ConfigError, match="sparsity"):
        prune(_options(root, text, sparsity=1.0), root / "bad", progress=False)
    with pytest.raises(ConfigError, match="forward must be one of auto, gated, gathered"):
        prune(_options(root, text, forward="sliced"), root / "bad", progress=False)


def test_gathered_forward_gives_the_gated_run(workdir):
    # The two ways of evaluating a step's masks agree to float rounding, so the seeded runs match.
    root, text = workdir
    runs = {f: prune(_options(root, text, forward=f, steps=3), root / f"fwd-{f}", progress=False)
            for f in ("gated", "gathered")}
    logs = {f: [json.loads(line) for line in (root / f"fwd-{f}" / "metrics.jsonl").read_text().splitlines()]
            for f in runs}
    losses = {f: [r["loss"] for r in log if "loss" in r] for f, log in logs.items()}
    assert len(losses["gated"]) == 3 and losses["gathered"] == pytest.approx(losses["gated"], rel=1e-5)
    assert runs["gathered"]["masks"] == runs["gated"]["masks"]


@pytest.mark.parametrize("forward,init", [("gated", "wanda-sp"), ("gathered", "wanda-sp"), ("gated", "flap")])
def test_compensated_pg_exports_the_model_it_optimised(workdir, forward, init, monkeypatch):
    # --compensate: PG scores mean-filled masked models, and the exported model carries the same
    # FLAP biases, so gated, pruned and reloaded perplexities agree; the init is compensated too.
    root, text = workdir
    name = f"text:{text}"
    out = root / f"comp-{forward}-{init}"
    import pgprune.metrics.calibration as calibration

    passes = []  # calibration passes the mean fill runs itself: none when FLAP's dense statistics serve
    collect = calibration.collect_layer_stats
    monkeypatch.setattr(calibration, "collect_layer_stats", lambda *a, **kw: passes.append(1) or collect(*a, **kw))
    # the tracked masks' exported (compensated) models reuse those statistics too: no pass per evaluation
    record = prune(_options(root, text, pg_reconstruct="bias", reconstruct="bias", forward=forward, init=init, steps=3,
                            track_max_tokens=10**6), out, progress=False)
    assert len(passes) == (0 if init == "flap" else 1)
    ppl = record["perplexity"]
    assert ppl["pruned"][name] == pytest.approx(ppl["gated"][name], rel=1e-4)
    model, tok = load_pruned(out / "model", dtype="fp32", device="cpu")
    assert evaluate_perplexity(model, tok, name, seqlen=32).ppl == pytest.approx(ppl["pruned"][name], rel=1e-4)
    layers = model.config.pgprune["layers"]
    assert any(ls["o_proj_bias"] or ls["down_proj_bias"] for ls in layers)  # the compensation is exported
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["hard_ppl"] == pytest.approx(ppl["init"][name], rel=1e-6)  # step 0 = compensated init
    plain = prune(_options(root, text, steps=0, init=init), root / f"plain-{forward}-{init}", progress=False)
    assert plain["perplexity"]["init"][name] != pytest.approx(ppl["init"][name], rel=1e-3)


@pytest.mark.parametrize("units", ["channel,head", "layer"])
def test_pg_scored_with_least_squares_exports_the_model_it_optimised(workdir, monkeypatch, units):
    # --pg-reconstruct lsq: every sampled mask is scored on its own least-squares refit (gathered
    # views); the start, the tracked masks and the final mask are refit the same way, and the
    # exported model (--reconstruct lsq with dense inputs, from the same covariances: no further pass)
    # scores the same. With layer units that includes the removed runs' regressions (RunRegressions).
    root, text = workdir
    name = f"text:{text}"
    out = root / f"pg-lsq-{units}"
    layers = dict(units="layer", init="block-influence", allocation="global", sparsity=0.3) if units == "layer" else {}
    import pgprune.metrics.calibration as calibration

    passes = []
    collect = calibration.collect_layer_stats
    monkeypatch.setattr(calibration, "collect_layer_stats",
                        lambda *a, **kw: passes.append(kw.get("covariance", False)) or collect(*a, **kw))
    record = prune(_options(root, text, pg_reconstruct="lsq", reconstruct="lsq", reconstruct_inputs="dense",
                            forward="auto", steps=2, track_max_tokens=10**6, **layers), out,
                   progress=False)  # tracked refit as exported: the kept covariances serve each evaluation too
    assert passes == [True]  # one covariance pass serves the loop and the final refit
    assert record["execution"]["forward"] == "gathered" and record["reconstruction"]["mode"] == "lsq"
    if units == "layer":
        assert record["reconstruction"]["removed_runs_regressed"]
    ppl = record["perplexity"]
    assert ppl["pruned"][name] == pytest.approx(ppl["gated"][name], rel=1e-4)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["hard_ppl"] == pytest.approx(ppl["init"][name], rel=1e-6)
    model, tok = load_pruned(out / "model", dtype="fp32", device="cpu")
    assert evaluate_perplexity(model, tok, name, seqlen=32).ppl == pytest.approx(ppl["pruned"][name], rel=1e-4)
    with pytest.raises(ConfigError, match="--forward gathered"):
        prune(_options(root, text, pg_reconstruct="lsq", forward="gated"), root / "bad-lsq", progress=False)


def test_pg_lsq_from_scores_bias_first_then_least_squares(workdir):
    # --pg-lsq-from 2: steps 1-2 are scored bias-compensated, step 3 on each mask's least-squares refit.
    # The same seed draws the same batches and masks, so the first two losses equal a bias-scored run's
    # (same policy updates too), and the third, from the same policy, differs from it only by the scoring.
    root, text = workdir
    common = dict(forward="auto", steps=3, eval_every=10, reconstruct="lsq", reconstruct_inputs="dense")
    losses = {}
    for name, options in {"bias": dict(pg_reconstruct="bias"), "lsq": dict(pg_reconstruct="lsq"),
                          "switch": dict(pg_reconstruct="lsq", lsq_from=2)}.items():
        out = root / f"pg-lsq-from-{name}"
        record = prune(_options(root, text, **common, **options), out, progress=False)
        log = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        losses[name] = [entry["loss"] for entry in log if "loss" in entry]
    assert record["settings"]["pg"]["lsq_from"] == 2
    assert losses["switch"][:2] == pytest.approx(losses["bias"][:2], rel=1e-6)
    assert losses["switch"][0] != pytest.approx(losses["lsq"][0], rel=1e-3)
    assert losses["switch"][2] != pytest.approx(losses["bias"][2], rel=1e-3)
    for bad in (dict(pg_reconstruct="bias", lsq_from=2), dict(pg_reconstruct="lsq", lsq_from=3),
                dict(pg_reconstruct="lsq", lsq_from=-1)):
        with pytest.raises(ConfigError, match="--pg-lsq-from"):
            prune(_options(root, text, **common, **bad), root / "bad-lsq-from", progress=False)


@pytest.mark.parametrize("init,units", [("wanda-sp", "channel,head"), ("magnitude", "channel,head"),
                                        ("obs", "channel,head"), ("block-influence", "layer"),
                                        ("wanda-sp", "channel,head,layer")])
def test_feature_policy_pipeline(workdir, init, units, monkeypatch):
    # --policy features: starts at the init metric's mask (step 0 == init), moves, and exports the
    # model it evaluated; a data-free init metric gets its features from a dense calibration pass,
    # the same one the mean fill uses. One budget over channels, heads and layers starts, under the
    # uniform allocation, from the channel / head mask with every layer kept (no layers removed first).
    root, text = workdir
    name = f"text:{text}"
    out = root / f"feat-{init}-{units}"
    import pgprune.metrics.calibration as calibration

    passes = []  # calibration passes prune() runs itself (run_metric's own are not counted)
    collect = calibration.collect_layer_stats
    monkeypatch.setattr(calibration, "collect_layer_stats", lambda *a, **kw: passes.append(kw.get("propagate"))
                        or collect(*a, **kw))
    record = prune(_options(root, text, policy="features", init=init, units=units, estimator="loo", lr=0.2,
                            init_scale=4.0, allocation="global" if units == "layer" else "uniform",
                            sparsity=0.25 if units != "layer" else 0.3, track_max_tokens=10**6, pg_reconstruct="bias", reconstruct="bias",
                            control_variate=True, remove_layers=0), out, progress=False)
    ppl = record["perplexity"]
    assert ppl["pruned"][name] == pytest.approx(ppl["gated"][name], rel=1e-4)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["hard_ppl"] == pytest.approx(ppl["init"][name], rel=1e-6)
    # block influence's and obs's dense statistics (obs's without their covariances) serve the mean fill;
    # otherwise one dense pass serves the fill and (magnitude: a data-free metric) the features; the
    # tracked masks' exported (compensated) models reuse it, no pass per evaluation
    assert passes == ([] if init in ("block-influence", "obs") else ["dense"])
    learned = record["pg"]["policy"]
    assert learned["features"][0] == init and record["settings"]["pg"]["policy"] == "features"
    assert record["settings"]["pg"]["control_variate"] is True
    if units == "channel,head,layer":
        start = record["metric"]["masks"]
        assert start["layers_kept"] == len(start["channels_per_layer"]) == 3  # the tiny model's layers
    if units != "layer":
        assert learned["features"] == [init] + [m for m in ("wanda-sp", "flap", "magnitude") if m != init]
        assert learned["weights"]["channel"] != [1.0, 0.0, 0.0]  # the updates reached the parameters


def test_search_policy_pipeline(workdir):
    # --policy search: starts at the init metric's mask, every draw on the budget, and exports the model
    # it evaluated; run.json says which policy ran and with what sigma
    root, text = workdir
    name = f"text:{text}"
    out = root / "search"
    record = prune(_options(root, text, policy="search", sigma=0.3, init="wanda-sp", lr=0.2, init_scale=4.0,
                            allocation="uniform", track_max_tokens=10**6, pg_reconstruct="bias", reconstruct="bias"),
                   out, progress=False)
    ppl = record["perplexity"]
    assert ppl["pruned"][name] == pytest.approx(ppl["gated"][name], rel=1e-4)
    assert abs(record["masks"]["sparsity"] - 0.25) < 0.03
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loss" in r for r in log[1:]) and log[0]["hard_ppl"] is not None
    learned = record["pg"]["policy"]
    assert learned["policy"] == "search" and learned["sigma"] == 0.3
    assert learned["weights"]["channel"] != [1.0, 0.0, 0.0]  # the updates reached the parameters


def test_search_beside_layers_removed_first_keeps_them_and_starts_at_the_metric(workdir):
    # --remove-layers 1: FLAP's start removes the layer of lowest block influence first; the search learns the
    # channels / heads beside it and keeps that layer removed; step 0 is the metric run's exported model, and the
    # exported model is the one evaluated
    from pgprune.masks import Masks

    root, text = workdir
    name = f"text:{text}"
    layers_first = dict(units="channel,head,layer", remove_layers=1, reconstruct="bias", sparsity=0.5)
    alone = prune(_options(root, text, method="flap", **layers_first), root / "flap-layers-first", progress=False)
    removed = alone["metric"]["remove_layers"]["layers"]
    assert len(removed) == 1 and alone["metric"]["unit_kinds"] == ["channel", "head", "layer"]
    out = root / "search-layers-first"
    record = prune(_options(root, text, policy="search", sigma=0.3, init="flap", lr=0.2, init_scale=4.0,
                            track_max_tokens=10**6, pg_reconstruct="bias", **layers_first), out, progress=False)
    assert record["metric"]["remove_layers"]["layers"] == removed
    masks = Masks.load(out / "masks.safetensors")
    assert (~masks["layer"][:, 0]).nonzero().flatten().tolist() == removed
    assert abs(record["masks"]["sparsity"] - 0.5) < 0.03
    ppl = record["perplexity"]
    assert ppl["pruned"][name] == pytest.approx(ppl["gated"][name], rel=1e-4)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["hard_ppl"] == pytest.approx(alone["perplexity"]["pruned"][name], rel=1e-4)


def test_remove_layers_auto_scores_each_count_as_the_export_ships_it(workdir):
    # --remove-layers auto: counts 0, 1, ... each scored as the export ships it (the same number as a run with
    # that fixed count gives for its pruned model); the run prunes with the lowest. Three layers at 50 %: one
    # layer's parameters fit in the budget, two do not, so the counts are 0 and 1.
    root, text = workdir
    name = f"text:{text}"
    opts = dict(method="flap", units="channel,head,layer", sparsity=0.5, reconstruct="lsq", track_max_tokens=10**6)
    record = prune(_options(root, text, remove_layers="auto", **opts), root / "layers-auto", progress=False)
    choice = record["start_choice"]["remove_layers"]
    counts = {int(n): v for n, v in choice["candidates"].items()}
    assert list(counts) == [0, 1]
    best = min(counts, key=counts.get)
    assert choice["chosen"] == best and record["metric"]["remove_layers"]["count"] == best
    assert choice["layers"] == record["metric"]["remove_layers"]["layers"] and len(choice["layers"]) == best
    one = prune(_options(root, text, remove_layers=1, **opts), root / "layers-1", progress=False)
    assert counts[1] == pytest.approx(one["perplexity"]["pruned"][name], rel=1e-4)
    assert record["perplexity"]["pruned"][name] == pytest.approx(counts[best], rel=1e-4)


def test_auto_start_and_layer_count_choose_the_method_again_at_the_chosen_count(workdir):
    # --init auto with --remove-layers auto: the count is swept for the method lowest without layers, then every
    # candidate is scored at that count (each the number its own fixed-count run gives for its pruned model) and
    # the lowest of those starts PG
    root, text = workdir
    name = f"text:{text}"
    opts = dict(units="channel,head,layer", sparsity=0.5, reconstruct="lsq", track_max_tokens=10**6)
    record = prune(_options(root, text, policy="features", init="auto", init_scale=4.0, steps=1, remove_layers="auto",
                            pg_reconstruct="bias", **opts), root / "auto-both", progress=False)
    choice = record["start_choice"]
    layers = choice["remove_layers"]
    best = layers["chosen"]
    assert layers["swept"] == min(choice["candidates"], key=choice["candidates"].get)
    assert layers["starts"][layers["swept"]] == layers["candidates"][best]
    assert set(layers["starts"]) == set(choice["candidates"])
    assert choice["chosen"] == min(layers["starts"], key=layers["starts"].get)
    assert record["metric"]["method"] == choice["chosen"].split(" ")[0]
    assert len(layers["layers"]) == best == record["metric"]["remove_layers"]["count"]
    for label, value in layers["starts"].items():
        method, allocation = label.rstrip(")").split(" (")
        alone = prune(_options(root, text, method=method, allocation=allocation, remove_layers=best, **opts),
                      root / f"auto-both-{method}", progress=False)
        assert value == pytest.approx(alone["perplexity"]["pruned"][name], rel=1e-4)
    log = [json.loads(line) for line in (root / "auto-both" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["hard_ppl"] == pytest.approx(layers["starts"][choice["chosen"]], rel=1e-6)


def test_lowest_count_goes_on_past_a_bump_and_stops_after_two_counts_without_a_new_best():
    from pgprune.pruning import lowest_count

    def run(values, most):
        asked = []

        def score(n):
            asked.append(n)
            return values[n]

        return (*lowest_count(score, most), asked)

    best, scores, asked = run([222.0, 192.9, 198.6, 179.4, 185.0, 190.0, 100.0], 6)
    assert best == 3 and asked == [0, 1, 2, 3, 4, 5] and scores[3] == 179.4 and 6 not in scores
    assert run([94.0, 89.1, 82.9, 82.5, 78.1, 88.4, 90.0, 91.0], 7)[:1] == (4,)
    assert run([5.0, 4.0, 3.0], 1) == (1, {0: 5.0, 1: 4.0}, [0, 1])  # the budget's most
    assert run([5.0, 6.0, 7.0, 1.0], 3) == (0, {0: 5.0, 1: 6.0, 2: 7.0}, [0, 1, 2])


def test_auto_start_is_the_candidate_whose_exported_model_is_lower_on_the_tracking_text(workdir):
    # --init auto scores each candidate mask as the export would ship it: the same number as that
    # metric method's own run gives for its pruned model (the single text file is every split here)
    root, text = workdir
    name = f"text:{text}"
    record = prune(_options(root, text, policy="features", init="auto", init_scale=4.0, steps=2,
                            track_max_tokens=10**6, pg_reconstruct="bias", reconstruct="lsq"),
                   root / "auto-start", progress=False)
    choice = record["start_choice"]
    assert set(choice["candidates"]) == {"wanda-sp (uniform)", "flap (global)", "obs (uniform)"}
    assert choice["chosen"] == min(choice["candidates"], key=choice["candidates"].get)
    assert record["metric"]["method"] == choice["chosen"].split(" ")[0]
    for label, value in choice["candidates"].items():
        method, allocation = label.rstrip(")").split(" (")
        alone = prune(_options(root, text, method=method, allocation=allocation, reconstruct="lsq"),
                      root / f"auto-start-{method}", progress=False)
        assert value == pytest.approx(alone["perplexity"]["pruned"][name], rel=1e-4)
    # tracked under the export's refit (the default), step 0 is the chosen candidate's exported model
    log = [json.loads(line) for line in (root / "auto-start" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["hard_ppl"] == pytest.approx(choice["candidates"][choice["chosen"]], rel=1e-6)


def test_tracking_under_the_export_refit_selects_the_mask_it_ships(workdir):
    # --track-reconstruct export: every tracked mask is scored refit as the export refits it, so the
    # exported model's perplexity on the tracking text is the lowest tracked value
    root, text = workdir
    name = f"text:{text}"
    out = root / "track-export"
    record = prune(_options(root, text, policy="features", init_scale=4.0, lr=0.3, steps=6, track_max_tokens=10**6,
                            pg_reconstruct="bias", reconstruct="lsq", track_reconstruct="export", select="best"),
                   out, progress=False)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tracked = [r["hard_ppl"] for r in log if "hard_ppl" in r]
    assert len(tracked) == 4 and record["pg"]["track"]["reconstruct"] == "lsq"
    assert record["perplexity"]["pruned"][name] == pytest.approx(min(tracked), rel=1e-4)
    # step 0 is the start, Wanda-sp's mask, as its own run ships it
    alone = prune(_options(root, text, method="wanda-sp", reconstruct="lsq"), root / "track-export-wanda",
                  progress=False)
    assert tracked[0] == pytest.approx(alone["perplexity"]["pruned"][name], rel=1e-4)


def test_feature_policy_needs_a_metric_init(workdir):
    root, text = workdir
    with pytest.raises(ConfigError, match="constant"):
        prune(_options(root, text, policy="features", init="constant"), root / "feat-const", progress=False)
    with pytest.raises(ConfigError, match="policy must be"):
        prune(_options(root, text, policy="neural"), root / "feat-bad", progress=False)


@pytest.mark.parametrize("bad, match", [(dict(policy="features", floor=0.1), "floor"),
                                        (dict(estimator="loo", k=1), "K"),
                                        (dict(select="worst"), "select"),
                                        (dict(policy="features", init="constant"), "constant")])
def test_bad_pg_settings_refused_before_the_model_loads(workdir, monkeypatch, bad, match):
    from pgprune.models import load

    root, text = workdir
    monkeypatch.setattr(load, "load_model", lambda *a, **kw: pytest.fail("loaded the model before refusing"))
    with pytest.raises(ConfigError, match=match):
        prune(_options(root, text, **bad), root / "bad-pg", progress=False)


def _no_model_load(monkeypatch):
    from pgprune.models import load

    monkeypatch.setattr(load, "load_model", lambda *a, **kw: pytest.fail("loaded the model before refusing"))


def test_unknown_method_is_refused_before_the_model_loads(workdir, monkeypatch):
    root, text = workdir
    _no_model_load(monkeypatch)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        prune(_options(root, text, method="nope"), root / "bad-method", progress=False)
    assert not (root / "bad-method").exists()


@pytest.mark.parametrize("case", ["unknown model", "missing data", "unreachable sparsity"])
def test_a_run_that_fails_early_leaves_no_folder(workdir, case):
    from pgprune.errors import PgpruneError

    root, text = workdir
    kw = {"unknown model": dict(model=str(root / "no-such-model")),
          "missing data": dict(calib=f"text:{root / 'no-such-text.txt'}"),
          "unreachable sparsity": dict(units="layer", sparsity=0.999, method="magnitude")}[case]
    out = root / f"early-{case.replace(' ', '-')}"
    with pytest.raises(PgpruneError):
        prune(_options(root, text, **kw), out, progress=False)
    assert not out.exists()


def test_a_run_stopped_after_its_auto_start_search_resumes_without_searching_again(workdir, monkeypatch):
    # start.json keeps what --init / --remove-layers auto chose: a run stopped before its first checkpoint keeps its
    # folder, and --resume runs that start alone, ending where an uninterrupted run ends
    import pgprune.policy.loop as loop
    import pgprune.pruning as pruning
    from pgprune import run_folder
    from pgprune.errors import CheckpointError
    from pgprune.masks import Masks

    root, text = workdir
    opts = dict(policy="features", init="auto", init_scale=4.0, steps=2, units="channel,head,layer", sparsity=0.5,
                remove_layers="auto", pg_reconstruct="bias", reconstruct="lsq", track_max_tokens=10**6)
    whole = prune(_options(root, text, **opts), root / "auto-whole", progress=False)
    assert whole["start_choice"]["remove_layers"]["chosen"] == 1  # the resumed start removes a layer first
    out = root / "auto-stopped"
    with monkeypatch.context() as m:
        def stop(*args, **kwargs):
            raise KeyboardInterrupt

        m.setattr(loop, "run_policy_gradient", stop)
        with pytest.raises(KeyboardInterrupt):
            prune(_options(root, text, **opts), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [run_folder.START_FILE]
    with pytest.raises(CheckpointError, match="pg.steps"):
        prune(_options(root, text, **{**opts, "steps": 3}), out, resume=True, progress=False)
    with monkeypatch.context() as m:
        m.setattr(pruning, "_choose_metric", lambda *a, **k: pytest.fail("searched again on --resume"))
        resumed = prune(_options(root, text, **opts), out, resume=True, progress=False)
    stored = [json.loads((folder / "run.json").read_text())["start_choice"] for folder in (out, root / "auto-whole")]
    assert stored[0] == {**stored[1], "resumed": True}
    timeless = [{k: v for k, v in r["metric"].items() if k != "seconds"} for r in (resumed, whole)]
    assert timeless[0] == timeless[1] and resumed["perplexity"] == whole["perplexity"]
    a, b = (Masks.load(folder / "masks.safetensors") for folder in (out, root / "auto-whole"))
    assert a.kinds == b.kinds and all(torch.equal(a[k], b[k]) for k in a.kinds)


def test_resume_with_other_settings_is_refused_before_loading(workdir, monkeypatch):
    root, text = workdir
    out = root / "resume-early"
    prune(_options(root, text, steps=2), out, progress=False)
    _no_model_load(monkeypatch)
    from pgprune.errors import CheckpointError

    with pytest.raises(CheckpointError, match="pg.lr"):
        prune(_options(root, text, steps=2, lr=0.5), out, resume=True, progress=False)
    assert (out / "run.json").is_file()  # the finished run is untouched
