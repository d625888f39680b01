"""bench/refit_targets.py's plain sequential refit: its `layer` target is the library's sequential
least-squares refit (the same logits), and the targets that read the dense model differ from it only
after the first block, where the pruned and the dense inputs part."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import refit_targets  # noqa: E402
from pgprune.masks import Masks  # noqa: E402
from pgprune.models.adapter import get_adapter  # noqa: E402
from pgprune.reconstruction import DEFAULT_DAMP, reconstruct, refit_applied  # noqa: E402
from structure_helpers import costs_of, logits, make_model, random_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_target_is_the_library_sequential_refit_and_the_others_part_after_the_first_block():
    model = make_model("llama")
    adapter, costs = get_adapter(model), costs_of(model)
    g = torch.Generator().manual_seed(3)
    masks = Masks({"head": torch.rand(costs.num_layers, costs.units_per_layer("head"), generator=g) > 0.4,
                   "channel": torch.rand(costs.num_layers, costs.units_per_layer("channel"), generator=g) > 0.4})
    masks["head"][:, 0] = True
    masks["channel"][:, 0] = True
    masks["head"][0, 1:] = False  # layer 0's attention block refits (the first block the targets share)
    calib, held_out = random_ids(8, 16, seed=4), random_ids(4, 16, seed=5)
    refit = reconstruct(model, calib, masks, "lsq", inputs="sequential", progress=False)
    with refit_applied(model, masks, refit):
        library = logits(model, held_out)
    plain = {t: refit_targets.refit_model(model, adapter, masks, costs, calib, t, DEFAULT_DAMP)
             for t in refit_targets.TARGETS}
    torch.testing.assert_close(logits(plain["layer"], held_out), library, rtol=1e-4, atol=1e-4)
    first = {t: get_adapter(m).layer(0).o_proj for t, m in plain.items()}
    for t in ("dense", "stream"):  # the first block sees the dense inputs and stream: the same refit
        torch.testing.assert_close(first[t].weight, first["layer"].weight, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(logits(plain[t], held_out), library, rtol=1e-3, atol=1e-3)
