"""Run settings: recipes, the CLI built from them, resume rules, and validation before loading."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

from pgprune.cli import build_parser, main, settings_from_args
from pgprune.config import RECIPES, RESUME_MAY_CHANGE, RunSettings, differences, walk_fields
from pgprune.errors import ConfigError


def test_the_defaults_are_the_features_recipe():
    assert RunSettings() == RunSettings.from_recipe("features")
    for path, value in RECIPES["features"]["values"].items():
        assert RunSettings().get(path) == value, path


def test_the_paper_recipe_holds_the_authors_settings():
    s = RunSettings.from_recipe("paper")
    assert (s.pg.policy, s.pg.estimator, s.pg.init, s.pg.init_mapping, s.pg.init_scale) == \
        ("units", "paper", "wanda-sp", "per-layer", 1.0)
    assert (s.pg.lr, s.pg.lr_schedule, s.pg.steps, s.pg.k, s.pg.batch_size, s.pg.reconstruct, s.reconstruct) == \
        (2e-3, "cosine", 15000, 2, 8, "none", "none")
    assert (s.data.calib, s.data.seqlen, s.recipe) == ("c4", 128, "paper")
    assert (s.pg.projection, s.pg.per_kind_budget, s.pg.baseline, s.pg.batches) == ("reference", True, "ema", "stream")
    assert s.pool_size() == 15000 * 8  # 120k windows, each seen once


def _parse(*argv):
    return settings_from_args(build_parser().parse_args(["prune", *argv, "--out", "x"]))


def test_explicit_options_override_the_recipe():
    s = _parse("--recipe", "paper", "--lr", "0.1", "--pg-reconstruct", "none", "--eval-max-tokens", "0", "--forward",
               "gated", "somemodel")
    assert (s.model, s.pg.lr, s.pg.steps, s.pg.policy, s.eval.max_tokens, s.execution.forward) == \
        ("somemodel", 0.1, 15000, "units", None, "gated")
    s = _parse("--recipe", "paper", "--pg-reconstruct", "bias", "--reconstruct", "lsq", "--policy", "features")
    assert (s.pg.reconstruct, s.reconstruct, s.pg.policy, s.data.calib) == ("bias", "lsq", "features", "c4")
    assert _parse() == RunSettings()  # nothing given: the default recipe


def test_remove_layers_takes_a_count_or_auto():
    assert _parse("--units", "channel,head,layer", "--remove-layers", "3").remove_layers == 3
    s = _parse("--units", "channel,head,layer", "--remove-layers", "auto")
    assert s.remove_layers == "auto"
    s.validate()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        _parse("--remove-layers", "two")


@pytest.mark.parametrize("overrides, layers_first", [
    ({}, "auto"),  # the default: channels, heads and layers, the layers first
    ({"remove_layers": 2}, 2),
    ({"remove_layers": 0}, None),
    # auto turns itself off where layers cannot go first, so the default suits any --units / start
    ({"units": "channel,head"}, None),
    ({"units": "layer"}, None),
    ({"units": "channel,mlp,layer"}, None),
    ({"pg.init": "constant", "pg.policy": "units"}, None),
    ({"method": "block-influence", "units": "layer"}, None),
    ({"method": "flap"}, "auto"),
])
def test_remove_layers_auto_applies_where_layers_can_go_first(overrides, layers_first):
    s = RunSettings.from_recipe("features", overrides)
    s.validate()
    assert s.layers_first == layers_first


def test_every_setting_has_a_cli_option():
    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    dests = {a.dest for a in prune._actions}
    missing = [path for path, _ in walk_fields() if path not in dests]
    assert not missing


def _help(*argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["prune", *argv])
    return buf.getvalue()


def test_default_help_reads_as_a_tool():
    short = _help("--help")
    options = {line.split()[0].rstrip(",") for line in short.splitlines() if line.startswith("  -")}
    assert len(options) <= 25, sorted(options)
    assert "--control-variate" not in short and "--floor" not in short
    full = _help("--help-all")
    assert "--control-variate" in full and "experimental" in full and "--init-scale" in full


def test_python_dash_m_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "pgprune", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("pgprune ")


def test_settings_round_trip_and_unknown_keys():
    s = RunSettings.from_recipe("paper", {"pg.lr": 0.5, "data.nsamples": 64})
    assert RunSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="unknown setting"):
        RunSettings.from_dict({**s.to_dict(), "pg": {**s.to_dict()["pg"], "momentum": 0.9}})
    with pytest.raises(ConfigError, match="unknown recipe"):
        RunSettings.from_recipe("best-ever")
    # a run.json written under an earlier name of a setting reads back under the new one
    old = s.to_dict()
    old["pg"]["compensate"] = old["pg"].pop("reconstruct") == "bias"
    old["pg"]["widths"] = "fixed"
    del old["pg"]["offsets"]
    back = RunSettings.from_dict(old)
    assert back.pg.reconstruct == "none" and back.pg.offsets == "fixed"


def test_resume_fingerprint_leaves_out_only_what_may_change():
    a = RunSettings()
    b = RunSettings.from_recipe("features", {"execution.device": "cuda", "eval.datasets": "c4",
                                             "eval.max_tokens": None, "data.data_dir": "/data",
                                             "execution.tensorboard": "tb", "gguf": "f16"})
    assert not differences(a.resume_fingerprint(), b.resume_fingerprint())
    assert len(RESUME_MAY_CHANGE) == 6
    c = RunSettings.from_recipe("features", {"pg.lr": 0.03})
    assert differences(a.resume_fingerprint(), c.resume_fingerprint()) == [f"pg.lr: {a.pg.lr} then, 0.03 now"]


@pytest.mark.parametrize("overrides, match", [
    ({"method": "nope"}, "unknown method"),
    ({"pg.init": "nope"}, "unknown --init"),
    ({"data.calib": "nope"}, "unknown dataset"),
    ({"eval.datasets": "wikitext2,nope"}, "unknown dataset"),
    ({"units": "channel,neuron"}, "unit"),
    ({"execution.forward": "sliced"}, "forward must be one of"),
    ({"pg.init_scale": 0.0}, "init-scale"),
    ({"data.nsamples": 4}, "smaller than one batch"),
    ({"pg.baseline": "others", "pg.k": 1}, "needs --k >= 2"),
    ({"pg.baseline": "others", "pg.estimator": "loo"}, "the paper estimator"),
    ({"remove_layers": 2, "units": "channel,head"}, "needs --units layer beside channel"),
    ({"remove_layers": 2, "units": "layer"}, "needs --units layer beside channel"),
    ({"remove_layers": 2, "units": "channel,mlp,layer"}, "nothing else"),
    ({"remove_layers": -1, "units": "channel,head,layer"}, ">= 0"),
    ({"remove_layers": 2, "units": "channel,head,layer", "pg.init": "constant"}, "--init constant has none"),
    ({"remove_layers": 2, "units": "channel,head,layer", "method": "block-influence"}, "block-influence has none"),
    ({"remove_layers": "some", "units": "channel,head,layer"}, "a count >= 0 or auto"),
])
def test_validation_names_what_to_fix(overrides, match):
    with pytest.raises(Exception, match=match):
        RunSettings.from_recipe("features", overrides).validate()


def test_docs_list_every_option_with_its_default():
    from pathlib import Path

    from pgprune.config import flag_of

    doc = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    rows = {line.split("|")[2].strip(" `"): line for line in doc.splitlines() if line.startswith("| ") and "`" in line}
    defaults = RunSettings()
    for path, f in walk_fields(defaults):
        if path == "recipe":
            continue
        assert path in rows, f"docs/method.md lacks {path}"
        assert (flag_of(path, f) == "model" or f"`{flag_of(path, f)}`" in rows[path]), path
        value = defaults.get(path)
        assert (str(value) if value not in (None, "") else "—") in rows[path], path


def test_choices_agree_with_the_registries():
    from dataclasses import fields

    from pgprune.budget import PROJECTIONS
    from pgprune.config import PGSettings
    from pgprune.gating import FORWARDS
    from pgprune.policy.estimators import ESTIMATORS

    choices = {f.name: f.metadata["choices"] for f in fields(PGSettings)}
    assert set(choices["estimator"]) == set(ESTIMATORS) and set(choices["projection"]) == set(PROJECTIONS)
    forward = next(f for path, f in walk_fields() if path == "execution.forward")
    assert set(forward.metadata["choices"]) == {"auto", *FORWARDS}
