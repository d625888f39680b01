"""What a sequential least-squares refit aims at: three targets on the masks of finished runs, written plainly.

Every refit here walks the calibration windows layer by layer with the layers before already pruned and refit
(sequential inputs x_p, as `--reconstruct-inputs sequential`), and refits the kept input columns of o_proj and
down_proj (and a bias) by ridge least squares (ridge = damp x the mean input variance, pulling the columns
towards the dense ones, as the library does); they differ in what the refit block should reproduce:
- layer: W x_p, the dense projection on the pruned model's own inputs (the library's sequential refit; this
  plain version must score what the run folder's exported model scores);
- dense: W x_d, the dense projection on the dense model's inputs (an asymmetric target: the refit also
  corrects the drift of its inputs);
- stream: W x_d + (h_d - h_p), where h is the residual stream entering the block: the block also pulls the
  pruned model's stream back onto the dense one.
For each run folder (its masks.safetensors and run.json: model, calibration source and seed) the refits use
the first 128 calibration windows of the run's pool, the windows its own final refit used, and the refit model
is scored under recipe_targets.py's protocol (WikiText-2 test, first --wikitext-tokens; the natural-text measure).

    python bench/refit_targets.py --data-dir ../shared/data --targets layer,stream,dense \\
        --folders runs/recipe_targets_obs/wiki-sample_s0_0.5_features+pg.init-obs+pg.lr-0.01 --tag refit_targets

Writes bench/results/TAG.json (after every refit) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, save, table  # noqa: E402
from recipe_targets import protocol, score_model  # noqa: E402
from pgprune.pruning import METRIC_NSAMPLES, load_session  # noqa: E402  (METRIC_NSAMPLES: a final refit's windows)
from pgprune.reconstruction import DEFAULT_DAMP  # noqa: E402

TARGETS = ("layer", "dense", "stream")


def centred_cross(a: torch.Tensor, b: torch.Tensor, mean_a: torch.Tensor, mean_b: torch.Tensor) -> torch.Tensor:
    """Cov(a, b) [Fa, Fb] float64 over the rows (tokens); the product in float32, as the library's batch grams."""
    return ((a - mean_a.float()).T @ (b - mean_b.float())).double() / a.shape[0]


def fit_block(weight: torch.Tensor, x_p: torch.Tensor, x_d: torch.Tensor, drift: torch.Tensor | None,
              keep: torch.Tensor, target: str, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight [out, in] with the dropped columns 0, bias [out]) of one projection `weight` (float64) whose
    inputs are x_p [tokens, in] in the pruned model and x_d in the dense one; drift [tokens, out]: h_d - h_p."""
    kept = keep.nonzero().flatten()
    mean_p = x_p.double().mean(0)
    if target == "layer":
        mean_t, cross = weight @ mean_p, weight @ centred_cross(x_p, x_p[:, kept], mean_p, mean_p[kept])
    else:
        mean_d = x_d.double().mean(0)
        mean_t, cross = weight @ mean_d, weight @ centred_cross(x_d, x_p[:, kept], mean_d, mean_p[kept])
        if target == "stream":
            mean_r = drift.double().mean(0)
            mean_t, cross = mean_t + mean_r, cross + centred_cross(drift, x_p[:, kept], mean_r, mean_p[kept])
    new = torch.zeros_like(weight)
    if len(kept) == 0:  # nothing kept: the block's mean output
        return new, mean_t
    c_ss = centred_cross(x_p[:, kept], x_p[:, kept], mean_p[kept], mean_p[kept])
    ridge = damp * float((x_p - mean_p.float()).pow(2).double().mean(0).mean())
    w_s = weight[:, kept]
    # min ||t - (W_S + Delta) x_S - b||^2 + ridge ||Delta||^2, centred: Delta (C_SS + ridge I) = C_tS - W_S C_SS
    delta = torch.linalg.solve(c_ss + ridge * torch.eye(len(kept), dtype=c_ss.dtype), (cross - w_s @ c_ss).T).T
    new[:, kept] = w_s + delta
    return new, mean_t - new[:, kept] @ mean_p[kept]


def refit_model(dense, adapter, masks, costs, calib_ids: torch.Tensor, target: str, damp: float):
    """A copy of `dense` with the dropped columns of o_proj / down_proj zeroed and the kept ones refit for
    `target` (the pruned model's function: surgery would only remove the zero columns)."""
    from pgprune.metrics.calibration import capture_layer_inputs, hidden_states_of
    from pgprune.models.adapter import get_adapter

    eff = masks.effective(costs)
    pruned = copy.deepcopy(dense)
    pruned_adapter = get_adapter(pruned)
    inputs = capture_layer_inputs(dense, calib_ids, batch_size=8, adapter=adapter)
    h_d, h_p = inputs.hidden.clone(), inputs.hidden.clone()

    def run(layer, stream, kwargs, hooks: dict) -> dict:
        """layer over every window batch of `stream` with pre-hooks {name: module}: {name: inputs [tokens, F]}
        and "out": the layer's output."""
        seen = {name: [] for name in hooks}
        handles = [m.register_forward_pre_hook(lambda _m, a, name=name: seen[name].append(
            a[0].reshape(-1, a[0].shape[-1]).float())) for name, m in hooks.items()]
        out = torch.empty_like(stream)
        try:
            with torch.no_grad():
                for b, kw in zip(inputs.batches, kwargs):
                    out[b] = hidden_states_of(layer(stream[b], **kw))
        finally:
            for h in handles:
                h.remove()
        return {"out": out, **{name: torch.cat(v) for name, v in seen.items()}}

    for i in range(adapter.num_layers):
        d, p = adapter.layer(i), pruned_adapter.layer(i)
        kwargs = [kw[i] for kw in inputs.kwargs]
        dense_run = run(d.layer, h_d, kwargs, {"attn": d.o_proj, "mlp": d.down_proj, "mid": d.post_attention_norm})
        for block, proj, keep in (("attn", "o_proj", adapter.expand_head_mask(eff["head"][i], "o")),
                                  ("mlp", "down_proj", eff["channel"][i])):
            module = getattr(p, proj)
            keep = keep[: module.in_features].bool()
            if bool(keep.all()):
                continue
            # the pruned inputs with this layer's earlier block already refit (true-sequential order)
            pruned_run = run(p.layer, h_p, kwargs, {"x": module, "mid": p.post_attention_norm})
            drift = ((h_d - h_p).reshape(-1, h_d.shape[-1]).float() if block == "attn"
                     else dense_run["mid"] - pruned_run["mid"])
            weight, bias = fit_block(getattr(d, proj).weight.detach().double(), pruned_run["x"], dense_run[block],
                                     drift, keep, target, damp)
            with torch.no_grad():
                module.weight.copy_(weight.to(module.weight.dtype))
                module.bias = torch.nn.Parameter(bias.to(module.weight.dtype))
        h_d, h_p = dense_run["out"], run(p.layer, h_p, kwargs, {})["out"]
    return pruned


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folders", required=True, help="comma list of finished `pgprune prune` run folders")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    p.add_argument("--damp", type=float, default=DEFAULT_DAMP)
    p.add_argument("--wikitext-tokens", type=int, default=65536, help="first N WikiText-2 test tokens (0: all)")
    p.add_argument("--natural-tokens", type=int, default=32768, help="first N tokens of each natural-text set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default="refit_targets")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if unknown := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from pgprune.config import RunSettings
    from pgprune.data import get_calibration_windows
    from pgprune.masks import Masks

    args.dtype, args.device = "fp32", None
    record = {"command": command_line("refit_targets.py", sys.argv[1:] if argv is None else argv),
              "protocol": protocol(args), "damp": args.damp, "rows": []}
    for folder in [Path(f) for f in args.folders.split(",") if f]:
        settings = RunSettings.from_dict(json.loads((folder / "run.json").read_text())["settings"])
        settings.data.data_dir = args.data_dir or settings.data.data_dir
        session = load_session(settings)
        calib = get_calibration_windows(session.tokenizer, settings.data.calib, settings.pool_size(1),
                                        settings.data.seqlen, seed=settings.seed,
                                        data_dir=settings.data.data_dir)[:METRIC_NSAMPLES]
        masks = Masks.load(folder / "masks.safetensors")
        for target in targets:
            t0 = time.perf_counter()
            model = refit_model(session.model, session.adapter, masks, session.costs, calib, target, args.damp)
            fit_s = time.perf_counter() - t0
            row = {"folder": folder.name, "target": target, **score_model(model, session.tokenizer, args),
                   "fit_s": fit_s}
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            save(args.tag, record)
    print(table(record["rows"], ["folder", "target", "wikitext2", "c4", "wiki-sample", "natural", "fit_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
