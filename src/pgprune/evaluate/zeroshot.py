"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model.

    result = evaluate_zeroshot(model, tokenizer, ["boolq", "piqa"], data_dir="/work/shared/data", limit=100)
    print(format_zeroshot_table(result))

The model is wrapped with lm-eval's `HFLM(pretrained=model, tokenizer=...)`, so the numbers are the
ones `lm_eval --model hf` gives for the same weights (zero-shot, no chat template). Tasks come from
lm-eval's own registry when there is no data directory (they download from the hub), or from the
offline copies in `zeroshot_tasks.py` (same prompts and metrics, local files) when there is one.
A task without data is skipped, loudly: it is listed in `skipped` with the reason, the table says
so, and the average names the tasks it covers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from pgprune.errors import ConfigError, DataError
from pgprune.evaluate.zeroshot_tasks import KNOWN_TASKS, SPECS, build_local_task, missing_files

DEFAULT_TASKS = KNOWN_TASKS
# Per-task numbers reported in every result (None where the task has no such metric).
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr")


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """'boolq,piqa' / ['boolq', 'piqa'] / 'all' / None (all) -> validated names, in the given order."""
    if tasks is None:
        return list(DEFAULT_TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(DEFAULT_TASKS)
    unknown = [n for n in names if n not in KNOWN_TASKS]
    if unknown or not names:
        what = f"unknown task(s) {', '.join(unknown)}" if unknown else "no tasks given"
        raise ConfigError(f"{what}; known tasks: {', '.join(KNOWN_TASKS)} (or 'all')")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ConfigError(f"limit must be a positive number of examples per task (or None for all), "
                          f"got {limit!r}")
    return limit


@dataclass
class TaskResult:
    task: str
    n: int  # examples evaluated
    n_total: int  # examples in the task's split
    source: str  # local file, or hub dataset
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None
    perplexity_stderr: float | None = None
    version: Any = None

    def to_dict(self) -> dict:
        return {"task": self.task, **{m: getattr(self, m) for m in METRICS}, "n": self.n,
                "n_total": self.n_total, "source": self.source, "version": self.version}


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    skipped: dict[str, str]  # task -> why it was not evaluated
    limit: int | None
    batch_size: int | str
    data_dir: str | None
    seconds: float
    num_fewshot: int = 0
    lm_eval_version: str = ""
    requested: list[str] = field(default_factory=list)

    @property
    def average(self) -> dict:
        """Mean accuracy over the evaluated tasks; says which tasks it covers and which it lacks."""
        covered = [t for t in self.requested if t in self.tasks and self.tasks[t].acc is not None]
        value = statistics.fmean(self.tasks[t].acc for t in covered) if covered else None
        return {"metric": "acc", "value": value, "tasks": covered,
                "missing": [t for t in self.requested if t not in covered]}

    def to_dict(self) -> dict:
        return {"kind": "zeroshot", "num_fewshot": self.num_fewshot, "limit": self.limit,
                "batch_size": self.batch_size, "data_dir": self.data_dir,
                "lm_eval_version": self.lm_eval_version, "seconds": self.seconds,
                "requested": list(self.requested),
                "tasks": {t: r.to_dict() for t, r in self.tasks.items()},
                "skipped": dict(self.skipped), "average": self.average}


class _HFShim(torch.nn.Module):
    """Gives a plain nn.Module with the HF causal-LM forward what HFLM reads: config, device,
    tie_weights. The forward is the wrapped module's own."""

    def __init__(self, module: torch.nn.Module, config):
        super().__init__()
        self.module = module
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def tie_weights(self) -> None:  # the module's own business
        pass

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def make_lm(model: torch.nn.Module, tokenizer, batch_size: int | str = 8, max_length: int | None = None):
    """lm-eval's HFLM around an in-memory model (a PreTrainedModel, or any module with the HF
    causal-LM forward and a `config`)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel

    if tokenizer is None:
        raise ConfigError("zero-shot evaluation needs the model's tokenizer")
    if not isinstance(model, PreTrainedModel):
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError(f"{type(model).__name__} has no `config`; zero-shot evaluation needs a "
                              "Hugging Face causal LM or a module exposing its config")
        model = _HFShim(model, config)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool):
    """lm-eval logs every step at INFO/WARNING; keep errors only unless asked (our own messages
    report skipped tasks and the sample counts)."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _resolve_data_dir(data_dir) -> Path | None:
    try:
        from pgprune.paths import data_dir as resolve
    except ImportError:  # pragma: no cover - paths.py is part of the package
        return Path(data_dir).expanduser() if data_dir else None
    return resolve(data_dir)


def build_tasks(names: Sequence[str], data_dir: str | os.PathLike | None = None,
                *, verbose: bool = False) -> tuple[dict, dict[str, str], dict[str, str]]:
    """lm-eval Task objects for `names`: ({name: task}, {name: source}, {name: reason skipped}).

    With a data directory every task reads its local files (or is skipped when they are absent);
    without one, lm-eval's registry loads them from the hub."""
    names = parse_tasks(list(names))
    root = _resolve_data_dir(data_dir)
    tasks, sources, skipped = {}, {}, {}
    if root is not None:
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist; pass the folder holding boolq/, "
                            "piqa/, ... (see docs/evaluation.md), or no data directory to use the hub")
        for name in names:
            missing = missing_files(name, root)
            if missing:
                note = f" ({SPECS[name].note})" if SPECS[name].note else ""
                skipped[name] = (f"no local data: {', '.join(str(p) for p in missing)} not found{note}; "
                                 f"run with hub access and no data directory to evaluate it")
                continue
            tasks[name] = build_local_task(name, root)
            sources[name] = str(root / SPECS[name].files[0])
        return tasks, sources, skipped

    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval(verbose):
        manager = TaskManager()
        for name in names:
            try:
                tasks[name] = manager.load([name])["tasks"][name]
                sources[name] = f"hub:{SPECS[name].hub_dataset}"
            except Exception as e:  # lm-eval/datasets raise many kinds when the hub is unreachable
                skipped[name] = (f"lm-eval could not load it from the hub ({type(e).__name__}: "
                                 f"{str(e)[:200]}); pass a data directory (--data-dir) with the local "
                                 "files instead")
    return tasks, sources, skipped


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def evaluate_zeroshot(
    model: torch.nn.Module | None,
    tokenizer=None,
    tasks: str | Iterable[str] | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int | str = 8,
    bootstrap_iters: int = 1000,
    lm=None,
    verbose: bool = False,
) -> ZeroShotResult:
    """Zero-shot evaluation of `model` on `tasks` (names, comma string, or None/'all').

    `limit`: first N examples of each task (quick runs). `lm`: an lm-eval LM to use instead of
    wrapping `model` (tests use a fake one). `bootstrap_iters` only affects LAMBADA's perplexity
    stderr (accuracies have a closed-form stderr). Tasks without data are skipped with the reason
    in `result.skipped`; if none can run, DataError.
    """
    import lm_eval
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    names = parse_tasks(tasks)
    limit = _check_limit(limit)
    t0 = time.perf_counter()
    with _quiet_lm_eval(verbose):
        task_objs, sources, skipped = build_tasks(names, data_dir, verbose=verbose)
    for name, why in skipped.items():
        print(f"[pgprune] zero-shot: skipping {name}: {why}", file=sys.stderr)
    if not task_objs:
        raise DataError(f"none of the tasks {', '.join(names)} has data: "
                        + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    for task in task_objs.values():
        task.set_config(key="num_fewshot", value=0)

    was_training = model.training if model is not None else False
    try:
        with _quiet_lm_eval(verbose):
            if lm is None:
                if model is None:
                    raise ConfigError("give a model (and its tokenizer) or an lm-eval LM")
                lm = make_lm(model, tokenizer, batch_size=batch_size)
            loaded = TaskManager(include_defaults=False).load(list(task_objs.values()))
            out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                           log_samples=False)
    finally:
        if model is not None:
            model.train(was_training)  # HFLM switches the model to eval mode

    results: dict[str, TaskResult] = {}
    for name in names:
        if name not in task_objs:
            continue
        raw = out["results"][name]
        counts = out.get("n-samples", {}).get(name, {})
        tr = TaskResult(task=name, n=int(counts.get("effective", 0)), n_total=int(counts.get("original", 0)),
                        source=sources[name], version=out.get("versions", {}).get(name))
        for m in METRICS:  # lm-eval's keys are "<metric>,<filter>": acc,none / acc_stderr,none
            setattr(tr, m, _num(raw.get(f"{m},none")))
        results[name] = tr
    root = _resolve_data_dir(data_dir)
    return ZeroShotResult(tasks=results, skipped=skipped, limit=limit, batch_size=batch_size,
                          data_dir=str(root) if root is not None else None,
                          seconds=time.perf_counter() - t0, lm_eval_version=lm_eval.__version__,
                          requested=names)


def _fmt(x: float | None, scale: float = 100.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def format_zeroshot_table(result: ZeroShotResult | dict, title: str | None = None) -> str:
    """A plain-text table: one row per task (accuracies in %), the skipped tasks, the average."""
    d = result.to_dict() if isinstance(result, ZeroShotResult) else result
    lines = []
    if title:
        lines.append(title)
    lines.append(f"zero-shot (lm-eval {d['lm_eval_version']}, {d['num_fewshot']}-shot, "
                 f"limit {d['limit'] if d['limit'] else 'none'})")
    lines.append(f"{'task':<16}{'acc %':>9}{'±':>7}{'acc_norm %':>12}{'ppl':>10}{'n':>7}")
    for name in d["requested"]:
        if name in d["tasks"]:
            r = d["tasks"][name]
            ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
            lines.append(f"{name:<16}{_fmt(r['acc']):>9}{_fmt(r['acc_stderr']):>7}"
                         f"{_fmt(r['acc_norm']):>12}{ppl:>10}{r['n']:>7}")
        else:
            lines.append(f"{name:<16}{'skipped: ' + d['skipped'][name].split(';')[0]}")
    avg = d["average"]
    lines.append(f"{'average acc':<16}{_fmt(avg['value']):>9}   over {len(avg['tasks'])} task(s): "
                 f"{', '.join(avg['tasks'])}" + (f"; missing: {', '.join(avg['missing'])}" if avg["missing"] else ""))
    return "\n".join(lines)
