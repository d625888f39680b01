"""Shared bits of the benchmarks: machine description, table printing, JSON results."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from pgprune.evaluate.speed import machine_info

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **machine_info()}


def command_line(script: str, argv: list[str]) -> str:
    """How to rerun a benchmark, with the thread setting it ran under (it changes CPU timings)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + f"python bench/{script} " + " ".join(argv)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def load_setup(model_name: str, dtype: str, units: str):
    """(model, tokenizer, adapter, unit costs, PG unit layout for `units`), on the CPU."""
    from pgprune.masks import UnitCosts, parse_unit_kinds
    from pgprune.models.adapter import get_adapter
    from pgprune.models.load import load_model
    from pgprune.policy.probabilities import UnitLayout

    model, tok = load_model(model_name, dtype=dtype, device="cpu")
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    return model, tok, adapter, costs, UnitLayout.build(costs, parse_unit_kinds(units))


VALID_TAIL = "valid-tail"  # a calibration source of the benches only: in-domain text for WikiText-2


def valid_tail_windows(valid, skip_tokens: int, n: int, seqlen: int, seed: int = 0):
    """`n` seeded random windows from WikiText-2 validation tokens [1, N] after the first `skip_tokens`
    (the ones the bench scores masks on), i.e. calibration text of the evaluation's own domain."""
    import torch

    tail = valid[0, skip_tokens:]
    if tail.numel() <= seqlen:
        raise SystemExit(f"{VALID_TAIL}: only {tail.numel()} validation tokens after the first {skip_tokens}")
    starts = torch.randint(0, tail.numel() - seqlen, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tail[s:s + seqlen] for s in starts.tolist()])


def save(name: str, payload: dict) -> Path:
    from pgprune import atomic

    path = RESULTS_DIR / f"{name}.json"
    atomic.write_json(path, {"machine": machine(), **payload})
    print(f"wrote {path}")
    return path
