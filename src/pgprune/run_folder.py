"""The run folder: its file names and their readers and writers, in one place.

What `pgprune prune ... --out DIR` (Python: `pgprune.prune(settings, DIR)`) writes:

    run.json            settings (whole), execution (ranks, devices, dtype, forward), model, machine,
                        masks summary, perplexity per stage, metric / pg info
    metrics.jsonl       one record per PG step (pg only)
    start.json          the start --init / --remove-layers auto chose, so --resume skips their search (pg only)
    checkpoint.pt       the PG state to resume from (pg only; settings, step, policy state, log)
    probabilities.pt    final keep-probabilities {kind: [L, units]} (pg only)
    masks.safetensors   the final hard mask
    model/              the pruned Hugging Face folder
    model.OUTTYPE.gguf  the same model for llama.cpp (--gguf OUTTYPE)
    report.md, report.json, *.png   `pgprune report DIR` (pgprune.report)
    tensorboard/        --tensorboard without a folder

Every write is atomic (pgprune.atomic): a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pgprune import atomic
from pgprune.errors import CheckpointError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
START_FILE = "start.json"
PROBS_FILE = "probabilities.pt"
MASKS_FILE = "masks.safetensors"
MODEL_DIR = "model"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
TENSORBOARD_DIR = "tensorboard"


def gguf_file(outtype: str) -> str:
    """The run folder's GGUF export (`prune --gguf OUTTYPE`)."""
    return f"model.{outtype}.gguf"


# What makes a folder worth keeping after a failure: a run that can be resumed or was finished.
KEEPSAKES = (CHECKPOINT_FILE, START_FILE, RUN_FILE)

_HOW = "a run folder is written by `pgprune prune MODEL --out DIR` (Python: pgprune.prune(RunSettings(), DIR))"


# --- run.json -------------------------------------------------------------------------------------------------
def write_record(run_dir: Path, record: dict) -> None:
    atomic.write_json(Path(run_dir) / RUN_FILE, record)


def read_record(run_dir: str | Path) -> dict:
    """run.json of a finished run, checked for the keys every reader needs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; {_HOW}")
    path = run_dir / RUN_FILE
    if not path.is_file():
        unfinished = resumable(run_dir) or (run_dir / METRICS_FILE).is_file()
        hint = (" It holds a PG checkpoint / start / metrics log, so the run did not finish: continue it with "
                "`pgprune prune ... --resume --out DIR` using the original options." if unfinished else "")
        raise CheckpointError(f"{run_dir} has no {RUN_FILE}, so it is not a finished run folder; {_HOW}.{hint}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-run `pgprune prune` into a new folder") from e
    missing = [k for k in ("settings", "model", "masks", "perplexity") if k not in record]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it was not written by a finished "
                              "`pgprune prune` of this version: re-run it")
    return record


# --- metrics.jsonl --------------------------------------------------------------------------------------------
def append_metrics(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_metrics(run_dir: Path, records: list[dict]) -> None:
    atomic.write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(run_dir: str | Path) -> tuple[list[dict], int]:
    """Step records of metrics.jsonl, and the count of unreadable lines (a run killed mid-append
    can leave half a line)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict) and "step" in r:
            records.append(r)
        else:
            bad += 1
    return records, bad


# --- checkpoint.pt --------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, state: dict) -> None:
    """`state`: step, policy (its state_dict), baseline, skipped, history, best, fingerprint, seconds."""
    with atomic.temp_path(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run_dir: Path | None) -> dict:
    path = None if run_dir is None else Path(run_dir) / CHECKPOINT_FILE
    if path is None or not path.is_file():
        raise CheckpointError(f"no checkpoint to resume in {run_dir}; start a new run without --resume")
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {str(e)[:200]}); start a new run "
                              "without --resume") from e


# --- start.json -----------------------------------------------------------------------------------------------
def save_start(run_dir: Path, start: dict) -> None:
    """`start`: fingerprint (the run's resume fingerprint), method, allocation, remove_layers, choice (run.json's
    start_choice)."""
    atomic.write_json(Path(run_dir) / START_FILE, start)


def load_start(run_dir: Path) -> dict | None:
    """start.json, or None where the folder has none."""
    path = Path(run_dir) / START_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); start a new run without --resume") from e


def resumable(run_dir: Path) -> bool:
    """Whether --resume has something to go on from: a PG checkpoint, or the start an auto choice made."""
    return any((Path(run_dir) / name).is_file() for name in (CHECKPOINT_FILE, START_FILE))


# --- probabilities.pt, masks.safetensors ----------------------------------------------------------------------
def save_probabilities(run_dir: Path, probs: dict[str, torch.Tensor]) -> None:
    with atomic.temp_path(run_dir / PROBS_FILE) as tmp:
        torch.save({k: v.cpu() for k, v in probs.items()}, tmp)


def read_probabilities(run_dir: str | Path) -> tuple[dict, dict]:
    """({kind: [L, units] float}, {kind: [L, units] bool final hard mask}); empty without the file."""
    run_dir = Path(run_dir)
    path = run_dir / PROBS_FILE
    if not path.is_file():
        return {}, {}
    try:
        probs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: report it instead of a traceback
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {e}); re-run the pg run") from e
    hard: dict = {}
    if (run_dir / MASKS_FILE).is_file():
        from pgprune.masks import Masks

        masks = Masks.load(run_dir / MASKS_FILE)
        hard = {k: masks[k] for k in masks.kinds if k in probs and masks[k].shape == probs[k].shape}
    return {k: v.float() for k, v in probs.items()}, hard


def worth_keeping(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in KEEPSAKES)
