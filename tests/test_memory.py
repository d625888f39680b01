"""The memory plan against measured peak resident memory of PG steps on the CPU (in a fresh
subprocess, one thread, high-water mark reset before 8 consecutive steps), and the fit check's errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.memory import check_fits, estimate_pg_memory
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
# the high-water mark of 8 consecutive steps: one step's peak depends on the heap layout earlier
# steps left (see measure_peak_growth); the loop's footprint settles within a few steps
growth = measure_peak_growth(step, repeat=8)[0]
est = estimate_pg_memory(model, k=a["k"], batch_size=a["b"], seqlen=a["t"], nsamples=0, metric_nsamples=0)
print(json.dumps({"growth": growth, "estimate": est}))
"""


def _measure(spec: dict) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["growth"], r["estimate"]


def _check(spec, runs: int = 3):
    # the median of fresh processes: one process's heap layout can still shift its peak by a whole
    # activation tensor (measured in CI: 0.79 once, 0.88-1.02 otherwise, for mlp-bound)
    measured = sorted((_measure(spec) for _ in range(runs)), key=lambda r: r[0])
    growth, est = measured[runs // 2]
    b = est["breakdown"]
    predicted = b["pg_step_activations"] + b["probabilities_and_masks"]
    assert 0.8 <= predicted / growth <= 1.2, (predicted / 2**20, growth / 2**20, b)


@pytest.mark.parametrize("spec", [
    # MLP-dominated (wide intermediate, small vocabulary)
    {"model": "synthetic", "sizes": {"hidden_size": 256, "intermediate_size": 3072, "num_hidden_layers": 4,
                                     "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512},
     "k": 2, "b": 8, "t": 64},
    # LM-head-dominated (large vocabulary: logits chunks well above 32 MiB)
    {"model": "synthetic", "sizes": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32768},
     "k": 2, "b": 4, "t": 128},
], ids=["mlp-bound", "head-bound"])
def test_estimate_within_20_percent_of_measured_peak(spec):
    _check(spec)


@pytest.mark.integration
def test_estimate_within_20_percent_for_smollm2(smollm2):
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
    with pytest.raises(ConfigError, match=r"(?s)needs about.*only 0.00 GiB.*--batch-size.*bf16.*device_map"):
        check_fits(est, "cpu")
    small = {**est, "total_bytes": est["breakdown"]["weights"] + 500}
    check_fits(small, "cpu", weights_loaded=True)  # the weights are already resident
