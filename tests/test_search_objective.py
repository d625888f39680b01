"""bench/search_objective.py: its agreement measures and its per-batch losses against plain definitions."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import search_objective  # noqa: E402


def test_agreement_is_one_for_the_truth_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(40, 6, generator=g, dtype=torch.float64)
    truth = eps @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64)
    same = search_objective.agreement(truth[:, None].repeat(1, 3), truth, eps)
    assert all(abs(v - 1.0) < 1e-9 for v in same.values())
    flipped = search_objective.agreement(-truth[:, None].repeat(1, 3), truth, eps)
    assert abs(flipped["corr_with_truth"] + 1.0) < 1e-9 and abs(flipped["grad_cos_with_truth"] + 1.0) < 1e-9
    noisy = truth[:, None] + 3.0 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    got = search_objective.agreement(noisy, truth, eps)
    assert got["corr_batch_pairs"] < got["corr_with_truth"] < got["corr_all_batches_with_truth"] < 0.9


def test_lm_and_kl_match_plain_definitions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g)  # the positions that predict tokens 1..5 of a 6-token window
    ids = torch.randint(0, 11, (2, 6), generator=g)
    dense = F.log_softmax(torch.randn(2, 5, 11, generator=g), dim=-1)
    nll, kl = search_objective._lm_and_kl(logits, ids, dense)
    assert abs(nll - float(F.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1)))) < 1e-6
    want = F.kl_div(F.log_softmax(logits, -1), dense, log_target=True, reduction="none").sum(-1).mean()
    assert abs(kl - float(want)) < 1e-6 and kl > 0
    assert abs(search_objective._lm_and_kl(dense, ids, dense)[1]) < 1e-6


def test_summarise_reads_the_raw_losses_with_or_without_directions():
    g = torch.Generator().manual_seed(2)
    truth = torch.randn(12, 2, generator=g, dtype=torch.float64)
    lm = truth[:, :, None].repeat(1, 1, 2) * 3.0  # the truth's differences, scaled: perfect agreement
    lsq = torch.randn(12, 2, 2, generator=g, dtype=torch.float64)
    raw = {"lm": lm.tolist(), "lsq": lsq.tolist(), "truth": truth.tolist()}
    rows = search_objective.summarise(raw)
    assert [r["objective"] for r in rows] == ["lm, bias (today)", "lm, lsq refit"]
    assert abs(rows[0]["spearman_with_truth"] - 1.0) < 1e-9 and rows[0]["sign_agreement"] == 1.0
    assert "grad_cos_with_truth" not in rows[0] and rows[1]["corr_with_truth"] < 0.9
    raw["eps"] = torch.randn(12, 5, generator=g, dtype=torch.float64).tolist()
    assert abs(search_objective.summarise(raw)[0]["grad_cos_with_truth"] - 1.0) < 1e-9
