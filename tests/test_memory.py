"""The memory plan against the measured peak of PG steps on the CPU, and the fit check.

The plan counts live bytes. Each case runs in two fresh subprocesses (one thread each, run side by
side), the resident-memory high-water mark reset after a warm-up step (`measure_peak_growth`):
- live: with MALLOC_MMAP_THRESHOLD_=65536 glibc serves every block of 64 KiB or more by its own
  mmap and returns it on free, so the peak resident growth of a step is its live bytes (it agrees
  with torch's profiler to < 1 %: bench/memory_plan.py). Three steps, each within 10 % of the plan.
- default allocator: the footprint of 8 consecutive steps with glibc's defaults, as a real run
  holds it. Freed heap blocks make it larger than the live peak (a single step after a trim
  varies by whole activation tensors, hence the loop); it must lie between the plan and what
  `check_fits` asks for (plan + `allocator_slack`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.memory import ALLOCATOR_SLACK, allocator_slack, check_fits, estimate_pg_memory, required_bytes
from pgprune.models.synthetic import synthetic_config, synthetic_model

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

MEASURE = r"""
import json, sys, torch
torch.set_num_threads(1)
from pgprune.gating import masked_losses
from pgprune.masks import UnitCosts
from pgprune.memory import estimate_pg_memory, measure_peak_growth
from pgprune.models.adapter import get_adapter
from pgprune.policy.probabilities import UnitLayout, sample_masks
a = json.loads(sys.argv[1])
if a["model"] == "smollm2":
    from pgprune.models.load import load_model
    model, _ = load_model("smollm2-135m", dtype="fp32", device="cpu")
else:
    from pgprune.models.synthetic import synthetic_model
    model = synthetic_model("llama", **a["sizes"])
costs = UnitCosts.from_adapter(get_adapter(model))
layout = UnitLayout.build(costs, ("channel", "head"))
s = layout.present.float() * 0.5
ids = torch.randint(0, model.config.vocab_size, (a["b"], a["t"]), generator=torch.Generator().manual_seed(0))
seeds = iter(range(1, 1000))
def step():  # new masks every step, as in the PG loop
    m = sample_masks(s, a["k"], torch.Generator().manual_seed(next(seeds)))
    return masked_losses(model, ids, layout.masks(m), costs=costs)
step()  # warm-up: one-off allocations (thread pools, kernels) are not part of a step
if a["loop"]:  # the footprint of consecutive steps (default allocator)
    growth = [measure_peak_growth(step, repeat=a["loop"])[0]]
else:  # one step at a time (live bytes: stable from step to step)
    growth = [measure_peak_growth(step)[0] for _ in range(a["repeats"])]
est = estimate_pg_memory(model, k=a["k"], batch_size=a["b"], seqlen=a["t"], nsamples=0, metric_nsamples=0)
print(json.dumps({"growth": growth, "estimate": est}))
"""
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # every block >= 64 KiB is mmapped, unmapped on free
REPEATS, LOOP, BOUND = 3, 8, 0.10


def _measure_both(spec: dict) -> tuple[list[int], int, dict]:
    """(live growth of REPEATS single steps, default-allocator growth over LOOP steps, the plan)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    runs = [({**spec, "loop": 0, "repeats": REPEATS}, {**env, **LIVE_ENV}), ({**spec, "loop": LOOP}, env)]
    procs = [subprocess.Popen([sys.executable, "-c", MEASURE, json.dumps(a)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=e) for a, e in runs]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    live, default = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    return live["growth"], default["growth"][0], live["estimate"]


def _check(spec):
    live, default, est = _measure_both(spec)
    b = est["breakdown"]
    plan = b["pg_step_activations"] + b["probabilities_and_masks"]
    mib = [round(x / 2**20, 1) for x in live]
    ratios = [plan / x for x in live]
    report = (f"plan {plan / 2**20:.1f} MiB; live {mib} (plan/live {min(ratios):.3f}-{max(ratios):.3f}); "
              f"default allocator over {LOOP} steps {default / 2**20:.1f} MiB; "
              f"plan + slack {(plan + allocator_slack(est, 'cpu')) / 2**20:.1f} MiB")
    print(report)
    assert all(abs(r - 1) <= BOUND for r in ratios), report
    # what a process really holds: at least the live plan, at most what check_fits asks for
    assert plan * (1 - BOUND) <= default <= plan + allocator_slack(est, "cpu"), report


CASES = {
    # MLP-dominated (wide intermediate, small vocabulary)
    "mlp-bound": {"model": "synthetic", "sizes": {"hidden_size": 256, "intermediate_size": 3072, "num_hidden_layers": 4,
                                                  "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512},
                  "k": 2, "b": 8, "t": 64},
    # LM-head-dominated (large vocabulary: logits chunks of 127 MiB)
    "head-bound": {"model": "synthetic", "sizes": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32768},
                   "k": 2, "b": 4, "t": 128},
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_matches_live_peak_and_slack_covers_allocator(name):
    _check(CASES[name])


@pytest.mark.integration
def test_plan_matches_live_peak_for_smollm2(smollm2):
    _check({"model": "smollm2", "k": 2, "b": 8, "t": 128})


def test_weights_are_exact_and_terms_scale():
    model = synthetic_model("llama")
    est = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32)
    assert est["breakdown"]["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    # from the config alone (no model) the parameter count matches too (untied, no biases)
    est_cfg = estimate_pg_memory(synthetic_config("llama"), k=2, batch_size=4, seqlen=32)
    assert est_cfg["inputs"]["parameters"] == sum(p.numel() for p in model.parameters())
    bf16 = estimate_pg_memory(model, dtype=torch.bfloat16, k=2, batch_size=4, seqlen=32)
    assert bf16["breakdown"]["weights"] * 2 == est["breakdown"]["weights"]
    bigger = estimate_pg_memory(model, k=4, batch_size=4, seqlen=32)
    assert bigger["breakdown"]["pg_step_activations"] > est["breakdown"]["pg_step_activations"]
    assert est["total_bytes"] >= est["breakdown"]["weights"] + est["phases"]["pg_step"]
    # gathered forward: B rows at a time, plus one pruned view's decoder weights at most
    gathered = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32, forward="gathered")
    assert gathered["breakdown"]["pg_residual_stream"] * 2 == est["breakdown"]["pg_residual_stream"]
    decoder = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    assert gathered["breakdown"]["gathered_weights"] == decoder and est["breakdown"]["gathered_weights"] == 0
    with pytest.raises(ConfigError, match="forward"):
        estimate_pg_memory(model, forward="sliced")


def test_check_fits_raises_with_advice(monkeypatch):
    est = estimate_pg_memory(synthetic_model("llama"), k=2, batch_size=4, seqlen=32)
    check_fits(est, "cpu")  # a tiny model fits
    monkeypatch.setattr("pgprune.memory.available_bytes", lambda device: (1000, "MemAvailable in /proc/meminfo"))
    with pytest.raises(ConfigError, match=r"(?s)needs about.*allocator slack.*only 0.00 GiB.*--batch-size.*bf16.*device_map"):
        check_fits(est, "cpu")
    small = {**est, "total_bytes": est["breakdown"]["weights"] + 500,
             "breakdown": {**est["breakdown"], "pg_decoder": 0}}
    check_fits(small, "cpu", weights_loaded=True)  # the weights are already resident


def test_check_fits_asks_for_plan_plus_allocator_slack(monkeypatch):
    est = estimate_pg_memory(synthetic_model("llama"), k=2, batch_size=4, seqlen=32)
    b = est["breakdown"]
    for device, factor in (("cpu", ALLOCATOR_SLACK["cpu"]), ("cuda", ALLOCATOR_SLACK["cuda"]), ("mps", 0.0)):
        slack = allocator_slack(est, device)
        assert slack == int(factor * b["pg_decoder"])
        assert required_bytes(est, device) == int((est["total_bytes"] + slack) * 1.10)
        assert required_bytes(est, device, weights_loaded=True) == int((est["total_bytes"] - b["weights"] + slack) * 1.10)
    need = required_bytes(est, "cuda")
    monkeypatch.setattr("pgprune.memory.available_bytes", lambda device: (need, "free memory of cuda (test)"))
    check_fits(est, "cuda")  # exactly enough passes
    monkeypatch.setattr("pgprune.memory.available_bytes", lambda device: (need - 1, "free memory of cuda (test)"))
    with pytest.raises(ConfigError, match="needs about"):
        check_fits(est, "cuda")


def test_least_squares_covariances_are_planned_as_collected():
    # the plan's covariance bytes are those collect_layer_stats(covariance=True) allocates and the
    # precision matrices PG's per-mask refits cache beside them: every layer's while PG scores masks
    # by least squares, one layer's (in a walk phase) for the final refit
    from pgprune.metrics.calibration import collect_layer_stats
    from pgprune.reconstruction import DEFAULT_DAMP

    model = synthetic_model("llama")
    stats = collect_layer_stats(model, torch.randint(0, 100, (2, 16)), covariance=True, progress=False)
    for st in stats:
        for fs in (st.attn_in, st.mlp_in):
            fs.damped_precision(DEFAULT_DAMP)
    collected = sum(t.numel() * t.element_size() for st in stats for fs in (st.attn_in, st.mlp_in)
                    for t in (fs.comoment, *fs._precision.values()))
    plain = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32)
    lsq = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32, reconstruct="lsq", pg_reconstruct="lsq")
    assert plain["breakdown"]["reconstruction_covariances"] == plain["phases"]["final_refit"] == 0
    assert lsq["breakdown"]["reconstruction_covariances"] == collected
    assert lsq["total_bytes"] >= plain["total_bytes"] + collected
    final_only = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32, reconstruct="lsq")
    assert final_only["phases"]["final_refit"] > collected // len(stats)
    # sequential inputs (auto's for channel/head masks) hold one layer's o_proj and down_proj inputs of every window
    cfg = model.config
    held = 128 * 128 * (cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
                        + cfg.intermediate_size) * 4
    dense_inputs = estimate_pg_memory(model, k=2, batch_size=4, seqlen=128, reconstruct="lsq", reconstruct_inputs="dense")
    sequential = estimate_pg_memory(model, k=2, batch_size=4, seqlen=128, reconstruct="lsq")
    assert sequential["phases"]["final_refit"] - dense_inputs["phases"]["final_refit"] == held
    # auto (the default) refits whole-layer masks from dense inputs: nothing held
    layers = {inputs: estimate_pg_memory(model, k=2, batch_size=4, seqlen=128, reconstruct="lsq", units="layer",
                                         reconstruct_inputs=inputs)["phases"]["final_refit"]
              for inputs in ("auto", "dense", "sequential")}
    assert layers["auto"] == layers["dense"] < layers["sequential"]
    # removed layers regressed on the previous MLP's inputs: their joint covariance is planned too
    joint = 8 * (cfg.intermediate_size + cfg.hidden_size) ** 2
    with_layers = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32, units=("channel", "layer"), reconstruct="lsq")
    assert with_layers["phases"]["final_refit"] >= joint > 0
    # a covariance-reading init metric (obs) holds one layer's covariances during its walk
    obs = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32, metric_covariance=True)
    assert obs["phases"]["metric_init"] - plain["phases"]["metric_init"] >= collected // (2 * len(stats))
    # PG scoring layer masks by least squares holds the residual stream of the refit windows and as many
    # bytes of cached run statistics (RunRegressions), what collect_residual_stream returns, twice
    from pgprune.metrics.calibration import collect_residual_stream

    stream, _ = collect_residual_stream(model, torch.randint(0, 100, (128, 32)), progress=False)
    held_stream = sum(t.numel() * t.element_size() for t in stream)
    scored = estimate_pg_memory(model, k=2, batch_size=4, seqlen=32, units=("channel", "layer"), reconstruct="lsq",
                                pg_reconstruct="lsq")
    assert scored["breakdown"]["run_regressions"] == 2 * held_stream
    assert lsq["breakdown"]["run_regressions"] == 0  # no layer units: no runs
