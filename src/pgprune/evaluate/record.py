"""The one JSON shape every evaluation result is written in (`pgprune eval --json`, `pgprune bench
--json`, bench/zeroshot.py). Sections that were not measured are null; see docs/evaluation.md."""

from __future__ import annotations

import time
from typing import Any

SCHEMA = "pgprune.eval/1"


def evaluation_record(model: str, *, perplexity: list[dict] | None = None, zeroshot: dict | None = None,
                      speed: dict | None = None, baseline: str | None = None,
                      extra: dict[str, Any] | None = None) -> dict:
    """{schema, model, baseline, created, machine, perplexity, zeroshot, speed, extra}.

    `speed` is a SpeedComparison dict (one model compared with itself when there is no baseline),
    so readers find per-model numbers under speed.results and ratios under speed.ratios always."""
    from pgprune import __version__
    from pgprune.evaluate.speed import machine_info

    return {"schema": SCHEMA, "pgprune": __version__, "model": model, "baseline": baseline,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
            "perplexity": perplexity, "zeroshot": zeroshot, "speed": speed, "extra": extra or {}}
