"""Metric-based structured pruning: baselines and initialisers of the policy-gradient method.

    calibration  layer-by-layer statistics on calibration windows (collect_layer_stats)
    scores       METHODS registry: wanda-sp, flap, magnitude, random, block-influence (compute_scores)
    allocation   uniform / global budgets met exactly (allocate)
    init         keep-probabilities whose hard mask is the metric's mask (init_probabilities, hard_mask)
    prune        one call: prune_with_metric(model, calib_ids, method, sparsity, kinds, allocation)
"""

from pgprune.metrics.allocation import ALLOCATIONS, Allocation, allocate
from pgprune.metrics.init import INIT_METHODS, InitProbabilities, expected_keep_ratio, hard_mask, init_probabilities
from pgprune.metrics.prune import MetricResult, compensation_biases, prune_with_metric, run_metric
from pgprune.metrics.scores import METHODS, Scores, compute_scores

__all__ = [
    "ALLOCATIONS", "Allocation", "allocate", "INIT_METHODS", "InitProbabilities", "expected_keep_ratio",
    "hard_mask", "init_probabilities", "MetricResult", "compensation_biases", "prune_with_metric",
    "run_metric", "METHODS", "Scores", "compute_scores",
]
