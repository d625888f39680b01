"""Metric-based structured pruning: baselines and the starting masks of the policy-gradient method.

    calibration  layer-by-layer statistics on calibration windows (collect_layer_stats)
    scores       METHODS registry: wanda-sp, flap, magnitude, random, block-influence (compute_scores)
    allocation   uniform / global budgets met exactly (allocate); auto = each method's own
    pipeline     one call: run_metric(model, calib_ids, method, sparsity, kinds, allocation) -> MetricResult,
                 or metric_masks(...) -> (masks, output_bias, info)

The budget arithmetic they share with the policies lives in pgprune.budget, the bias compensation in
pgprune.reconstruction.
"""

from pgprune.metrics.allocation import ALLOCATIONS, Allocation, allocate
from pgprune.metrics.pipeline import MetricResult, metric_masks, resolve_allocation, run_metric
from pgprune.metrics.scores import METHODS, Scores, compute_scores

__all__ = [
    "ALLOCATIONS", "Allocation", "allocate", "MetricResult", "metric_masks",
    "resolve_allocation", "run_metric", "METHODS", "Scores", "compute_scores",
]
