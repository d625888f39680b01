"""pgprune: structural pruning of LLMs with forward passes only.

Public API (imported lazily so that `import pgprune` stays fast):
    load_model, load_pruned, get_adapter, Masks, UnitCosts, evaluate_perplexity, ...
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "pgprune.models.load",
    "get_adapter": "pgprune.models.adapter",
    "Masks": "pgprune.masks",
    "UnitCosts": "pgprune.masks",
    "PgpruneError": "pgprune.errors",
    "evaluate_perplexity": "pgprune.evaluate.perplexity",
    "load_pruned": "pgprune.models.load",
    "prune": "pgprune.pruning",
    "RunSettings": "pgprune.config",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pgprune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
