"""Which per-step objective tells the search policy most about the model it will export?

The search (`--policy search`) steps along the loss difference of one antithetic pair theta +- sigma eps,
scored on one 8 x 128 calibration batch under FLAP's bias compensation. What the run is judged on is the
model refit by least squares, on held-out text. This bench draws N directions eps at the start of a
default run (the init metric's mask; or where a run's checkpoint ended, --policy-from) and, for both masks
of each pair:
- on B calibration batches (PG's own windows): the LM loss (what PG scores today) and the mean
  KL(dense || pruned) per token (distillation from the dense model's next-token distribution, which
  needs one dense forward per batch), both bias-compensated, and the LM loss of the mask refit by
  least squares (what `--pg-reconstruct lsq` scores);
- the "truth": the LM loss on held-out calibration text (PG's tracking windows) of each mask refit
  by least squares (dense inputs, `per_mask_refit`, as `--pg-reconstruct lsq` scores).
It reports, per objective, how a batch's pair differences agree with the truth's over the directions
(Pearson, Spearman, the fraction of signs; mean over batches, and for the batches' mean difference),
how two batches' differences agree (how repeatable one batch is), and the cosine between the search
gradient estimated from all N directions on one batch and the truth's.

    OMP_NUM_THREADS=1 python bench/search_objective.py --data-dir ../shared/data --calib wiki-sample --sparsity 0.3 --init flap
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, save, table  # noqa: E402

from pgprune import atomic, run_folder  # noqa: E402
from pgprune.config import RunSettings  # noqa: E402
from pgprune.data import get_calibration_windows, get_eval_tokens  # noqa: E402
from pgprune.evaluate.perplexity import perplexity_of_tokens  # noqa: E402
from pgprune.metrics.pipeline import resolve_allocation, run_metric  # noqa: E402
from pgprune.metrics.calibration import collect_layer_stats  # noqa: E402
from pgprune.pruning import METRIC_NSAMPLES, load_session, start_policy  # noqa: E402
from pgprune.reconstruction import compensation_biases, feature_means, per_mask_refit  # noqa: E402
from pgprune.surgery import pruned_view  # noqa: E402


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of positions 0..T-2 (those that predict a token of the window)."""
    return model(input_ids=ids, use_cache=False).logits[:, :-1].float()


def _lm_and_kl(logits: torch.Tensor, ids: torch.Tensor, dense_logp: torch.Tensor | None) -> tuple[float, float]:
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    kl = float("nan") if dense_logp is None else (dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()
    return float(nll), float(kl)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-30))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-30))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def agreement(d: torch.Tensor, d_truth: torch.Tensor, eps: torch.Tensor | None = None) -> dict:
    """How one objective's pair differences d [directions, batches] agree with the truth's [directions]:
    per batch (Pearson, which a few large differences dominate as they dominate the search's step;
    Spearman; the fraction of directions whose sign agrees) and over the batches' mean, and as the
    search gradient sum_j d_j eps_j (eps [directions, P], if given)."""
    B = d.shape[1]
    out = {
        "corr_with_truth": sum(_corr(d[:, b], d_truth) for b in range(B)) / B,
        "spearman_with_truth": sum(_corr(_ranks(d[:, b]), _ranks(d_truth)) for b in range(B)) / B,
        "sign_agreement": float((torch.sign(d) == torch.sign(d_truth)[:, None]).double().mean()),
        "corr_batch_pairs": sum(_corr(d[:, a], d[:, b]) for a in range(B) for b in range(a + 1, B))
        / max(1, B * (B - 1) // 2),
        "corr_all_batches_with_truth": _corr(d.mean(1), d_truth),
        "spearman_all_batches_with_truth": _corr(_ranks(d.mean(1)), _ranks(d_truth)),
    }
    if eps is not None:
        g_truth = (d_truth[:, None] * eps).sum(0)
        out["grad_cos_with_truth"] = sum(_cos((d[:, b, None] * eps).sum(0), g_truth) for b in range(B)) / B
    return out


OBJECTIVES = {"lm": "lm, bias (today)", "kl": "kl to dense, bias", "lsq": "lm, lsq refit"}
COLUMNS = ["objective", "corr_with_truth", "spearman_with_truth", "sign_agreement", "corr_batch_pairs",
           "corr_all_batches_with_truth", "spearman_all_batches_with_truth", "grad_cos_with_truth", "corr_with_today"]


def summarise(raw: dict) -> list[dict]:
    """The table's rows from a run's raw losses ({lm, kl, lsq: [directions, 2, batches], truth:
    [directions, 2], eps: [directions, P]})."""
    truth = torch.tensor(raw["truth"], dtype=torch.float64)
    eps = torch.tensor(raw["eps"], dtype=torch.float64) if "eps" in raw else None
    d_truth = truth[:, 0] - truth[:, 1]
    diffs = {key: torch.tensor(raw[key], dtype=torch.float64) for key in OBJECTIVES if key in raw}
    diffs = {key: x[:, 0] - x[:, 1] for key, x in diffs.items()}
    rows = []
    for key, d in diffs.items():
        row = {"objective": OBJECTIVES[key], **agreement(d, d_truth, eps)}
        if "lm" in diffs:  # how alike it and today's objective judge the same pairs on the same batches
            row["corr_with_today"] = sum(_corr(d[:, b], diffs["lm"][:, b]) for b in range(d.shape[1])) / d.shape[1]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--calib", default="wiki-sample")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--init", default="flap", help="the start (what --init auto chose on the seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--directions", type=int, default=24)
    ap.add_argument("--batches", type=int, default=4, help="calibration batches of 8 x 128 per mask")
    ap.add_argument("--heldout-windows", type=int, default=64, help="held-out 128-token windows of the truth")
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--policy-from", metavar="RUN_DIR",
                    help="draw the pairs around the parameters of this run's checkpoint (a run of the same start, "
                         "calibration and seed) instead of the start")
    ap.add_argument("--tag", default="search_objective")
    ap.add_argument("--summarise", action="store_true",
                    help="recompute the table of bench/results/TAG.json from its raw losses (no model run)")
    args = ap.parse_args()
    if args.summarise:
        path = RESULTS_DIR / f"{args.tag}.json"
        saved = json.loads(path.read_text())
        old = {r["objective"]: r for r in saved.get("rows", [])}  # keeps what the raw losses cannot give again
        saved["rows"] = [{**old.get(r["objective"], {}), **r} for r in summarise(saved["raw"])]
        print(table(saved["rows"], COLUMNS))
        atomic.write_json(path, saved)  # the run's machine and command stay as they were
        return
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    settings = RunSettings.from_recipe("features", {"sparsity": args.sparsity, "seed": args.seed, "pg.init": args.init,
                                                    "pg.sigma": args.sigma, "data.calib": args.calib,
                                                    "data.data_dir": args.data_dir, "execution.dtype": "fp32"})
    session = load_session(settings)
    model, adapter, costs, kinds = session.model, session.adapter, session.costs, session.layout.kinds
    seqlen, bs, metric_bs = settings.data.seqlen, settings.pg.batch_size, settings.execution.metric_batch_size
    calib = get_calibration_windows(session.tokenizer, args.calib, METRIC_NSAMPLES + args.batches * bs, seqlen,
                                    seed=args.seed, data_dir=args.data_dir)
    metric = run_metric(model, calib[:METRIC_NSAMPLES], args.init, args.sparsity, kinds,
                        resolve_allocation(args.init, "auto", kinds), batch_size=metric_bs, seed=args.seed,
                        bias_compensation=False, progress=False)
    stats = collect_layer_stats(model, calib[:METRIC_NSAMPLES], batch_size=metric_bs, propagate="dense",
                                covariance=True)
    fill = feature_means(stats)
    refit = per_mask_refit(model, stats, calib[:METRIC_NSAMPLES], damp=settings.reconstruct_damp, costs=costs,
                           progress=False)
    policy = start_policy(session, metric)
    if args.policy_from:
        policy.load_state_dict(run_folder.load_checkpoint(Path(args.policy_from))["policy"])
    held = get_eval_tokens(session.tokenizer, args.calib, "heldout", args.data_dir)
    batches = [calib[METRIC_NSAMPLES + b * bs: METRIC_NSAMPLES + (b + 1) * bs] for b in range(args.batches)]
    dense_logp = [F.log_softmax(_logits(model, ids), dim=-1) for ids in batches]
    print(f"setup {time.perf_counter() - t0:.0f} s", flush=True)

    gen = torch.Generator().manual_seed(1234 + args.seed)
    eps_all, lm, kl, lsq, truth = [], [], [], [], []  # lm / kl / lsq: [directions, 2, batches]; truth: [.., 2]
    for d in range(args.directions):
        m = policy.sample(2, gen)  # one antithetic pair at theta
        eps_all.append(policy.last_directions[0].clone())
        lm_d, kl_d, lsq_d, tr_d = [], [], [], []
        for row in m:
            mask = session.layout.masks(row[None]).select(0)
            view = pruned_view(model, mask, output_bias=compensation_biases(adapter, fill, mask, costs))
            pairs = [_lm_and_kl(_logits(view, ids), ids, dlp) for ids, dlp in zip(batches, dense_logp)]
            lm_d.append([p[0] for p in pairs])
            kl_d.append([p[1] for p in pairs])
            r = refit(mask)
            view = pruned_view(model, mask, output_bias=r.output_bias, input_weights=r.input_weights)
            lsq_d.append([_lm_and_kl(_logits(view, ids), ids, None)[0] for ids in batches])
            tr_d.append(perplexity_of_tokens(view, held, seqlen=seqlen, batch_size=bs,
                                             max_tokens=args.heldout_windows * seqlen).nll)
        lm.append(lm_d), kl.append(kl_d), lsq.append(lsq_d), truth.append(tr_d)
        print(f"direction {d + 1}/{args.directions}: truth diff {tr_d[0] - tr_d[1]:+.4f}, "
              f"lm {lm_d[0][0] - lm_d[1][0]:+.4f}, kl {kl_d[0][0] - kl_d[1][0]:+.4f}, "
              f"lsq {lsq_d[0][0] - lsq_d[1][0]:+.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    raw = {"lm": lm, "kl": kl, "lsq": lsq, "truth": truth, "eps": torch.stack(eps_all).tolist()}
    rows = summarise(raw)
    print(table(rows, COLUMNS))
    save(args.tag, {"command": command_line("search_objective.py", sys.argv[1:]), "rows": rows,
                    "directions": args.directions, "batches": args.batches, "heldout_windows": args.heldout_windows,
                    "policy_from": args.policy_from,
                    "raw": raw, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
