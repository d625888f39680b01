"""A run's settings: one typed, nested structure, and the named recipes that preset it.

`RunSettings` is the single source of truth for what `pgprune prune` does. The CLI builds its
options from these fields (each field's metadata carries its flag and help: adding a knob means one
field here and its docs), `prune()` reads them, `run.json` and the PG checkpoint store them whole
(`to_dict`), and a resumed run must match them except for `RESUME_MAY_CHANGE`.

Recipes (`RECIPES`, `--recipe NAME`) are named, commented sets of values, nanoGPT-config style;
explicit options override them. The defaults of the dataclasses are the `features` recipe, our
best measured one (tests check that they agree).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from pgprune.errors import ConfigError
from pgprune.gguf_types import OUTTYPES as GGUF_OUTTYPES

# Field groups shown by `pgprune prune --help`; the others only by --help-all.
MAIN, ADVANCED, EXPERIMENTAL = "main", "advanced", "experimental"


def option(default, help: str, *, flag: str | None = None, group: str = MAIN, choices=None, **argparse_kwargs):
    """A settings field with its CLI description (flag defaults to --field-name)."""
    meta = {"help": help, "flag": flag, "group": group, "choices": choices, "argparse": argparse_kwargs}
    return field(default=default, metadata=meta)


def remove_layers_arg(value: str) -> int | str:
    """CLI parser of --remove-layers: a count, or auto."""
    return value if value == "auto" else int(value)


def max_tokens_arg(value: str) -> int | None:
    """CLI parser of a token limit: 0 means no limit (None)."""
    n = int(value)
    if n < 0:
        raise ValueError("must be >= 0")
    return n or None


@dataclass
class DataSettings:
    calib: str = option("wiki-sample", "calibration text: wiki-sample (offline default), c4, wikitext2, ptb, text:PATH")
    nsamples: int | None = option(None, "calibration windows (default: 128 for metrics; a pool of 1024 PG draws "
                                        "its batches from)", type=int)
    seqlen: int = option(128, "calibration window length in tokens", type=int)
    data_dir: str | None = option(None, "local data folder (WikiText-2, PTB, C4 files; see README); default: "
                                        "PGPRUNE_DATA_DIR, else the Hugging Face hub")


@dataclass
class PGSettings:
    """The policy-gradient method (--method pg)."""
    policy: str = option("search", "units: one free keep-probability per unit (the paper's); features: a few "
                                   "shared logit parameters over metric scores and per-layer widths, units drawn "
                                   "by Bernoulli; search: a Gaussian over the features policy's parameters, each "
                                   "draw an exact-budget mask (docs/method.md)",
                         choices=("units", "features", "search"))
    init: str = option("auto", "metric whose mask PG starts from (wanda-sp, flap, magnitude, random, "
                               "block-influence, obs), auto (of wanda-sp and obs at uniform widths and flap at its "
                               "global ones, the mask lowest on the --track text once reconstructed as the export "
                               "will be; --allocation does not apply), or constant (units policy only)")
    init_scale: float = option(8.0, "scale of the standardised init scores in the logits; larger keeps the "
                                    "samples nearer the start mask", group=ADVANCED, type=float)
    init_mapping: str = option("sigmoid", "how init scores become probabilities: sigmoid (starts at the metric's "
                                          "mask), constant, per-layer (the reference code's: each layer standardised "
                                          "and shifted to the keep ratio; its hard mask is not the metric's)",
                               group=ADVANCED, choices=("sigmoid", "constant", "per-layer"))
    reconstruct: str = option("bias", "how each sampled mask is scored: on the bias-compensated model (FLAP's: "
                                      "dropped features replaced by their calibration mean), as masked (none), or "
                                      "least-squares refit (lsq: a solve per mask and layer, removed layers "
                                      "regressed, gathered forward)",
                              flag="--pg-reconstruct", group=ADVANCED, choices=("none", "bias", "lsq"))
    lsq_from: int = option(0, "with --pg-reconstruct lsq: score the steps before this one bias-compensated (at "
                              "a fraction of the cost) and least squares only from it on; 0: least squares "
                              "throughout", flag="--pg-lsq-from", group=EXPERIMENTAL, type=int)
    steps: int = option(300, "optimisation steps (the paper: 15000 at lr 2e-3)", type=int)
    lr: float = option(0.01, "learning rate (units: SGD on the probabilities; features, search: Adam's step size)",
                       type=float)
    lr_schedule: str = option("cosine", "learning-rate schedule", group=ADVANCED, choices=("cosine", "constant"))
    k: int = option(2, "masks sampled per step", group=ADVANCED, type=int)
    batch_size: int = option(8, "calibration windows per step", group=ADVANCED, type=int)
    estimator: str = option("paper", "gradient estimator of the units and features policies: paper (the "
                                     "reference code's); loo and disarm are unbiased but measured noisier here "
                                     "(bench/RESULTS.md)", group=ADVANCED,
                            choices=("paper", "loo", "disarm"))
    select: str = option("best", "best: the tracked hard mask with the lowest perplexity on the --track set (by "
                                 "default held-out calibration text, the start included); final: the last step's",
                         choices=("final", "best"))
    eval_every: int = option(50, "steps between hard-mask evaluations on the --track set and checkpoints",
                             group=ADVANCED, type=int)
    batches: str = option("resample", "resample: each step draws its batch from the calibration pool; stream: "
                                      "step t takes the pool's next windows, each used once (the reference code's; "
                                      "the pool is then steps x batch windows)", group=ADVANCED,
                          choices=("resample", "stream"))
    baseline: str = option("previous", "paper estimator's baseline: previous (mean of the last window's mean losses), "
                                       "ema (the reference code's moving average, the current step included) or "
                                       "others (each mask: the mean loss of the step's other masks, same batch; "
                                       "measured noisier)",
                           group=ADVANCED, choices=("previous", "ema", "others"))
    # measured not to help (bench/RESULTS.md): kept for experiments
    control_variate: bool = option(False, "subtract from each loss what its mask's kept fraction explains "
                                          "(measured: 1 of 4 paired wins)", group=EXPERIMENTAL, action="boolean")
    offsets: str = option("learned", "features policy: learned (one offset per kind and layer moves that layer's "
                                     "width) or fixed (held at the start: widths then move only with the shared "
                                     "feature weights)", group=EXPERIMENTAL, choices=("learned", "fixed"))
    sigma: float = option(0.05, "search policy: standard deviation of its parameter draws (in standardised "
                               "score units)", group=ADVANCED, type=float)
    floor: float = option(0.0, "units policy: keep probabilities within [floor, 1-floor]", group=EXPERIMENTAL,
                          type=float)
    projection: str = option("cost", "units policy: budget projection shift proportional to unit cost, equal "
                                     "(uniform), or reference (the authors' code: each kind keeps its share of units, "
                                     "shifted down only; per-kind hard mask)", group=ADVANCED,
                             choices=("cost", "uniform", "reference"))
    per_kind_budget: bool = option(False, "units policy: hold each unit kind to the budget separately",
                                   group=ADVANCED, action="boolean")
    baseline_window: int = option(5, "paper estimator: the baseline's window (steps)", group=ADVANCED, type=int)


@dataclass
class EvalSettings:
    datasets: str = option("wikitext2", "perplexity datasets, comma-separated (wikitext2, ptb, c4, wiki-sample, "
                                        "text:PATH)", flag="--eval")
    seqlen: int = option(128, "perplexity window length (128 as the paper, LLM-Pruner and FLAP)",
                         flag="--eval-seqlen", group=ADVANCED, type=int)
    max_tokens: int | None = option(32768, "tokens per dataset for the dense / start / final perplexity (0 = all)",
                                    flag="--eval-max-tokens", type=max_tokens_arg)
    track: str | None = option(None, "dataset whose validation split scores the periodic hard masks (default: the "
                                     "held-out part of the calibration text, never drawn for calibration)",
                               group=ADVANCED)
    track_max_tokens: int = option(8192, "tokens of the periodic hard-mask perplexity", group=ADVANCED, type=int)
    track_reconstruct: str = option("export", "how each tracked hard mask is scored (and so chosen by --select "
                                              "best): export, refit as the exported model will be (--reconstruct: "
                                              "one refit per evaluation); pg, as PG scores its samples "
                                              "(--pg-reconstruct)", group=ADVANCED, choices=("export", "pg"))


@dataclass
class ExecutionSettings:
    dtype: str = option("auto", "weights: auto is bf16 where the device computes it natively, else fp32",
                        choices=("auto", "bf16", "fp16", "fp32"))
    device: str | None = option(None, "cpu, cuda, cuda:N, or auto (all GPUs, accelerate's device_map)")
    forward: str = option("auto", "how PG runs its K masked models: gated (one batched forward of the unchanged "
                                  "weights), gathered (each mask through a view of its kept weights), auto: the "
                                  "faster where measured (CPU: gathered; CUDA: gated)", group=ADVANCED,
                          choices=("auto", "gated", "gathered"))
    metric_batch_size: int = option(8, "windows per forward when collecting calibration statistics",
                                    group=ADVANCED, type=int)
    tensorboard: str | None = option(None, "write TensorBoard event files of the PG loop (default DIR: "
                                           "RUN_DIR/tensorboard; needs pgprune[tensorboard])", group=ADVANCED,
                                     nargs="?", const="", metavar="DIR")


@dataclass
class RunSettings:
    model: str = option("smollm2-135m", "hub id, local folder, .gguf file or smollm2-135m", flag="model")
    method: str = option("pg", "pg (policy gradient), or a metric baseline: wanda-sp, flap, magnitude, random, "
                               "block-influence, obs (structured OBS: the error a unit's removal adds once the "
                               "layer is refit by least squares)")
    sparsity: float = option(0.3, "fraction of the prunable (decoder-layer attention and MLP) parameters to remove",
                             type=float)
    units: str = option("channel,head,layer", "unit kinds: channel, head, attn, mlp, layer (comma-separated)")
    allocation: str = option("auto", "metric methods and PG's start: uniform (the same fraction per layer; "
                                     "beside channels / heads, whole blocks kept), global (one threshold), or "
                                     "auto (the method's own: global for flap and block-influence, else uniform; "
                                     "uniform when channels / heads mix with blocks, global for blocks alone)",
                             group=ADVANCED, choices=("auto", "uniform", "global"))
    remove_layers: int | str = option("auto", "with --units channel,head,layer: remove the N layers of lowest "
                                              "block influence (ShortGPT) first, then the method's channel / head "
                                              "order meets the rest of the budget over the kept layers (metric "
                                              "methods and PG's start; PG keeps that layer choice); auto: the N "
                                              "whose refit mask is lowest on the --track text, of 0, 1, 2, ... "
                                              "(docs/method.md), off where layers cannot go first (other --units)",
                                      group=ADVANCED,
                                      type=remove_layers_arg, metavar="N|auto")
    seed: int = option(0, "seed of the calibration windows, PG's batches and masks", type=int)
    reconstruct: str = option("lsq", "refit of the layers reading pruned features (o_proj, down_proj) in the "
                                      "exported model: none, bias (FLAP's mean compensation), lsq (least squares "
                                      "of the kept columns and the bias on calibration activations)",
                              choices=("none", "bias", "lsq"))
    reconstruct_inputs: str = option("auto", "inputs of the least-squares refit: sequential (from the model pruned "
                                             "and refit so far), dense (each layer from the dense model), or auto "
                                             "(dense when the mask removes only whole layers, else sequential: the "
                                             "better of the two where measured)", group=ADVANCED,
                                     choices=("auto", "dense", "sequential"))
    reconstruct_damp: float = option(0.01, "least-squares ridge, relative to the mean variance of the "
                                           "projection's inputs", group=ADVANCED, type=float)
    width_multiple: int = option(1, "every layer's kept MLP width a multiple of N (32: llama.cpp's q8_0 / q4_0, "
                                    "256: its k-quants); the rounding is chosen by the method's scores, the "
                                    "budget met as closely as the multiple allows", group=ADVANCED, type=int)
    gguf: str | None = option(None, "also write the pruned model as RUN_DIR/model.OUTTYPE.gguf for llama.cpp "
                                    "(`pgprune export --outtype`: " + ", ".join(GGUF_OUTTYPES) + "; quantized types "
                                    "need FFN widths in multiples of their row block, see --width-multiple)",
                              group=ADVANCED, metavar="OUTTYPE")
    recipe: str = option("features", "named preset of these settings (see --help-all / docs/method.md); "
                                     "explicit options override it", choices=("features", "paper"))
    data: DataSettings = field(default_factory=DataSettings)
    pg: PGSettings = field(default_factory=PGSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)

    # --- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, name: str = "features", overrides: dict[str, Any] | None = None) -> "RunSettings":
        """The recipe's settings with `overrides` ({"pg.lr": 0.01, "sparsity": 0.5, ...}) applied."""
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
        settings = cls()
        settings.set_many({**RECIPES[name]["values"], "recipe": name})
        settings.set_many(overrides or {})
        return settings

    def set_many(self, values: dict[str, Any]) -> None:
        for path, value in values.items():
            self.set(path, value)

    def set(self, path: str, value: Any) -> None:
        """Set a field by its dotted path ("pg.lr", "sparsity")."""
        *parents, name = path.split(".")
        target = self
        for p in parents:
            target = getattr(target, p, None)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"unknown setting {path!r}")
        if name not in {f.name for f in fields(target)}:
            raise ConfigError(f"unknown setting {path!r}")
        setattr(target, name, value)

    def get(self, path: str) -> Any:
        target = self
        for p in path.split("."):
            target = getattr(target, p)
        return target

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        """Inverse of to_dict; unknown keys are an error (a run.json from another version says so),
        except the renamed ones of `_RENAMED_SETTINGS`."""
        settings = cls()
        values = dict(_flatten(d))
        for old, (new, convert) in _RENAMED_SETTINGS.items():
            if old in values:
                values[new] = convert(values.pop(old))
        settings.set_many(values)
        return settings

    @property
    def kinds(self) -> tuple[str, ...]:
        from pgprune.masks import parse_unit_kinds

        return parse_unit_kinds(self.units)

    @property
    def metric(self) -> str:
        """The metric method the run prunes with, or PG's start (--init; `auto` and `constant` included)."""
        return self.pg.init if self.method == "pg" else self.method

    @property
    def metric_kinds(self) -> tuple[str, ...]:
        """The unit kinds the metric's own allocation covers: with whole layers removed first, the channel /
        head kinds over the kept layers."""
        return tuple(k for k in self.kinds if k != "layer") if self.layers_first else self.kinds

    @property
    def layers_first(self) -> int | str | None:
        """What --remove-layers does in this run: a count N > 0, "auto", or None (off: 0, or `auto` where whole
        layers cannot go first: no `layer` beside channel / head among the units, or a start without a
        channel / head order; so the default `auto` suits every --units)."""
        if self.remove_layers == "auto" and self._layers_first_refusal() is not None:
            return None
        return self.remove_layers or None

    def _layers_first_refusal(self) -> str | None:
        """Why whole layers cannot go first in this run; None where they can."""
        from pgprune.metrics.pipeline import check_layers_first

        try:
            check_layers_first(self.kinds, None)
        except ConfigError as e:
            return str(e)
        if self.metric in ("constant", "block-influence"):
            return (f"--remove-layers starts from a metric's channel / head order; "
                    f"{'--init' if self.method == 'pg' else '--method'} {self.metric} has none")
        return None

    def pool_size(self, world_size: int = 1) -> int:
        """Calibration windows drawn: the PG pool (streamed: one window per step, sample and rank), or
        the metric's windows."""
        if self.method != "pg":
            return self.data.nsamples or 128
        if self.pg.batches == "stream":
            return self.data.nsamples or self.pg.steps * self.pg.batch_size * world_size
        return self.data.nsamples or 1024

    # --- checking ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every option checked before anything is loaded: one ConfigError / DataError naming what to fix."""
        from pgprune.budget import check_sparsity
        from pgprune.data import get_source
        from pgprune.metrics.scores import METHODS

        for path, f in walk_fields(self):
            choices = f.metadata.get("choices")
            if choices and self.get(path) not in choices:
                raise ConfigError(f"{flag_of(path, f)} must be one of {', '.join(choices)}, got {self.get(path)!r}")
        check_sparsity(self.sparsity)
        kinds = self.kinds
        if self.method != "pg" and self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose pg or a metric: {', '.join(METHODS)}")
        if self.data.seqlen < 1 or self.eval.seqlen < 1:
            raise ConfigError("--seqlen and --eval-seqlen must be >= 1")
        from pgprune.budget import check_width_multiple

        check_width_multiple(self.width_multiple)
        if self.gguf is not None:
            self._validate_gguf(kinds)
        if self.remove_layers != "auto":  # an explicit count; auto turns itself off where it cannot apply
            self._validate_remove_layers()
        if self.reconstruct_damp < 0:
            raise ConfigError(f"--reconstruct-damp must be >= 0, got {self.reconstruct_damp}")
        if self.method == "pg" and self.pg.reconstruct == "lsq" and not {"channel", "head", "layer"} & set(kinds):
            raise ConfigError(f"--pg-reconstruct lsq refits the kept columns of partly pruned o_proj / down_proj and "
                              f"regresses removed layers; --units {self.units} only removes whole blocks, which keep "
                              "nothing to refit: use --pg-reconstruct bias (the same models at a fraction of the cost)")
        if self.data.nsamples is not None and self.data.nsamples < 1:
            raise ConfigError(f"--nsamples must be >= 1, got {self.data.nsamples}")
        for name in [self.data.calib, *self.eval_datasets, *([self.eval.track] if self.eval.track else [])]:
            get_source(name)
        if not self.eval_datasets:
            raise ConfigError("--eval needs at least one dataset")
        if self.method == "pg":
            self._validate_pg(kinds)

    def _validate_remove_layers(self) -> None:
        """--remove-layers refused now where the run could not use it (the count against the model: at run time)."""
        if not isinstance(self.remove_layers, int) or self.remove_layers < 0:
            raise ConfigError(f"--remove-layers must be a count >= 0 or auto, got {self.remove_layers!r}")
        refusal = self._layers_first_refusal() if self.remove_layers else None
        if refusal is not None:
            raise ConfigError(refusal)

    def _validate_gguf(self, kinds) -> None:
        """--gguf refused now, not after the run, where its widths could never be stored (more: prune's
        check of the loaded model's sizes, and export_gguf's own before it writes)."""
        from pgprune.gguf_types import check_outtype_name, row_block

        check_outtype_name(self.gguf)
        block = row_block(self.gguf)
        if "channel" in kinds and self.width_multiple % block:
            raise ConfigError(f"--gguf {self.gguf} stores rows in blocks of {block} values, so every kept FFN width "
                              f"must be a multiple of {block}: add --width-multiple {block}")

    def _validate_pg(self, kinds) -> None:
        from pgprune.metrics.scores import METHODS
        from pgprune.policy.estimators import get_estimator

        pg = self.pg
        if pg.init not in ("constant", "auto") and pg.init not in METHODS:
            raise ConfigError(f"unknown --init {pg.init!r}; choose auto, constant or a metric: {', '.join(METHODS)}")
        if pg.steps < 0 or pg.batch_size < 1 or pg.lr < 0 or pg.eval_every < 1 or pg.baseline_window < 1:
            raise ConfigError("--steps must be >= 0, --batch-size >= 1, --lr >= 0, --eval-every >= 1 and the "
                              "baseline window >= 1")
        if pg.baseline == "others" and (pg.k < 2 or pg.estimator != "paper"):
            raise ConfigError("--baseline others compares each mask with the step's other masks: it needs --k >= 2 "
                              "and the paper estimator (loo and disarm bring their own)")
        if pg.reconstruct == "lsq" and self.execution.forward == "gated":
            raise ConfigError("--pg-reconstruct lsq scores each sampled mask on its own refit pruned view: use "
                              "--forward gathered (or auto), not gated")
        if pg.lsq_from and (pg.reconstruct != "lsq" or not 0 < pg.lsq_from < pg.steps):
            raise ConfigError(f"--pg-lsq-from {pg.lsq_from} switches the scoring from bias to least squares within "
                              f"the run: it needs --pg-reconstruct lsq (got {pg.reconstruct}) and a step between "
                              f"1 and --steps - 1 ({pg.steps - 1})")
        if pg.init_scale <= 0:
            raise ConfigError(f"--init-scale must be > 0, got {pg.init_scale}")
        if not 0.0 <= pg.floor < 0.5:
            raise ConfigError(f"the probability floor must be in [0, 0.5), got {pg.floor}")
        if pg.init_mapping == "per-layer" and (pg.policy != "units" or pg.init == "constant"
                                               or not set(kinds) <= {"channel", "head"}):
            raise ConfigError("--init-mapping per-layer (the reference code's start) maps a metric's channel / head "
                              "scores for the units policy; use --policy units, --units channel,head and a metric --init")
        if pg.offsets != "learned" and pg.policy == "units":
            raise ConfigError("--offsets fixed holds the feature policy's per-layer offsets; use --policy features "
                              "(or search)")
        if pg.policy == "search" and (pg.k % 2 or pg.sigma <= 0):
            raise ConfigError(f"--policy search draws antithetic pairs with --sigma > 0: it needs an even --k "
                              f"(got {pg.k}) and a positive --sigma (got {pg.sigma})")
        if pg.policy == "search" and (pg.estimator != "paper" or pg.baseline != "previous" or pg.control_variate):
            raise ConfigError("--policy search brings its own estimator (the antithetic pair's difference); drop "
                              "--estimator, --baseline and --control-variate")
        if pg.policy in ("features", "search"):
            if pg.per_kind_budget or pg.floor > 0 or pg.projection != "cost":
                raise ConfigError("the features policy holds one global budget by a shift in logit space; it has "
                                  "no per-kind budget, probability floor or projection (drop --per-kind-budget / "
                                  "--floor / --projection)")
            if pg.init == "constant":
                raise ConfigError("--policy features starts from a metric's scores; choose --init wanda-sp (or "
                                  "another metric), not constant")
        if pg.batches == "stream" and self.pool_size() < pg.steps * pg.batch_size:
            raise ConfigError(f"--batches stream uses each window once: {pg.steps} steps x {pg.batch_size} windows need "
                              f"--nsamples >= {pg.steps * pg.batch_size} (got {self.pool_size()})")
        if self.pool_size() < pg.batch_size:
            raise ConfigError(f"the calibration pool of {self.pool_size()} windows is smaller than one batch of "
                              f"{pg.batch_size}; raise --nsamples or lower --batch-size")
        get_estimator(pg.estimator, pg.k)

    def describe(self) -> str:
        """The resolved settings, one `path=value` per setting (PG's only for --method pg)."""
        items = [f"{path}={self.get(path)!r}" for path, _ in walk_fields(self)
                 if self.method == "pg" or not path.startswith("pg.")]
        return ", ".join(items)

    def resume_fingerprint(self) -> dict:
        """The settings a resumed run must share with its checkpoint (all but RESUME_MAY_CHANGE)."""
        d = self.to_dict()
        for path in RESUME_MAY_CHANGE:
            *parents, name = path.split(".")
            target = d
            for p in parents:
                target = target[p]
            target.pop(name)
        return d

    @property
    def eval_datasets(self) -> list[str]:
        return [n.strip() for n in self.eval.datasets.split(",") if n.strip()]

    @property
    def final_reconstruct(self) -> str:
        """The final refit: least squares has nothing to refit when only whole attention / MLP blocks are
        pruned, where it is the mean compensation (`bias`) computed the cheap way (removed layers are
        regressed on the previous layer's MLP inputs, so `layer` units keep lsq)."""
        if self.reconstruct == "lsq" and not {"channel", "head", "layer"} & set(self.kinds):
            return "bias"
        return self.reconstruct

    @property
    def track_dataset(self) -> str:
        return self.eval.track or self.data.calib

    @property
    def track_split(self) -> str:
        """PG's tracking text: the calibration source's held-out documents, or --track's validation split."""
        return "validation" if self.eval.track else "heldout"


# Settings of earlier versions' run.json files: old path -> (new path, value conversion).
_RENAMED_SETTINGS = {"pg.compensate": ("pg.reconstruct", lambda on: "bias" if on else "none"),
                     "pg.widths": ("pg.offsets", lambda v: v)}  # its first name, 2026-12-02

# Settings a resumed run may change: where it runs and what it reports, not what it learns.
RESUME_MAY_CHANGE = ("execution.device", "execution.tensorboard", "data.data_dir", "eval.datasets",
                     "eval.max_tokens", "gguf")


def differences(old, new, prefix: str = "") -> list[str]:
    """'path: old then, new now' for every leaf where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} then, {new!r} now"]


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def walk_fields(obj=None, prefix: str = ""):
    """(dotted path, dataclass field) of every leaf setting, in declaration order."""
    obj = obj if obj is not None else RunSettings()
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def flag_of(path: str, f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


# --- recipes ------------------------------------------------------------------------------------------------
RECIPES: dict[str, dict] = {
    "features": {
        "doc": "our best measured recipe on SmolLM2-135M (bench/RESULTS.md): the whole layers of lowest block "
               "influence removed first, as many as held-out calibration text prefers, then a Gaussian search over "
               "the feature policy's parameters started at the best of the Wanda-sp, FLAP and obs masks, every "
               "sampled mask scored bias-compensated, 300 steps, the tracked mask whose refit model is lowest on "
               "held-out calibration text, refit by least squares",
        "values": {
            "units": "channel,head,layer",  # MLP channels, KV-head groups and whole layers under one budget ...
            "remove_layers": "auto",   # ... the layers first, as many as held-out calibration text prefers
                                       # (30 %, five runs: 0.94x / 0.92x the channel / head recipe, 0.93x /
                                       # 0.93x FLAP with the same layers; bench/RESULTS.md "Whole layers first")
            "pg.policy": "search",     # the feature policy's ~70 shared parameters (re-ranks 46k channels in
                                       # 300 steps), drawn as exact-budget masks: learns the per-layer widths
                                       # the Bernoulli draws blur (9 runs paired with --policy
                                       # features at 30 / 50 %: 0.93x / 0.94x, 16 of 18 measures lower)
            "pg.sigma": 0.05,          # the draws' spread (0.02 moved slower)
            "pg.init": "auto",         # start where the best metric method ends: Wanda-sp's, FLAP's or obs's
                                       # mask, whichever is lowest on held-out calibration text once refit
            "pg.init_scale": 8.0,      # a local search around the start (scale 1-4 wandered off)
            "pg.reconstruct": "bias",  # FLAP's bias compensation is worth more than most mask choices
            "reconstruct": "lsq",      # then refit by least squares: 30 % PG mask 168.7 -> 146.8, Wanda-sp 255.6 -> 170.8
            "reconstruct_inputs": "auto",  # sequential for channels / heads: 146.8 -> 138.4, 170.8 -> 152.8;
                                           # dense for whole layers (better on natural text, 4 of 4 masks)
            "pg.estimator": "paper",   # for --policy features / units: steadiest direction at the start
                                       # (split-half cosine 0.65); search brings its own
            "pg.steps": 300,
            "pg.lr": 0.01,             # Adam's step size on the shared parameters: the search moved further
                                       # at 0.01 than at 0.005 (10 paired runs: 0.97x / 0.94x; bench/RESULTS.md "The
                                       # search's step size"); the feature policy was best at 0.005 (0.02
                                       # re-ranked a good start within its first noisy steps)
            "pg.lr_schedule": "cosine",
            "pg.k": 2,
            "pg.batch_size": 8,
            "pg.select": "best",       # the tracked hard mask lowest on held-out calibration text (never the
                                       # test's domain): keeps a run that wanders off at its best (50 %, seed 2:
                                       # 780.1 -> 429.4, its start)
            "eval.track_reconstruct": "export",  # ... each tracked mask refit as exported: scored compensated,
                                                 # the selection picked masks the refit ranks worse (C4 30 %)
            "data.calib": "wiki-sample",
        },
    },
    "paper": {
        "doc": "the authors' settings and behaviour (Gao et al. 2025 and their reference code; docs/method.md "
               "lists every difference): a free probability per unit from per-layer standardised Wanda-sp scores, "
               "SGD at lr 2e-3 with cosine decay, 15k steps of K=2 masks on 8 x 128 C4 tokens each seen once, "
               "per-kind budgets, no compensation",
        "values": {
            "units": "channel,head",
            "remove_layers": 0,
            "pg.policy": "units",
            "pg.init": "wanda-sp",
            "pg.init_mapping": "per-layer",  # per-layer standardised scores, shifted to the keep ratio
            "pg.init_scale": 1.0,
            "pg.reconstruct": "none",
            "reconstruct": "none",
            "pg.estimator": "paper",
            "pg.steps": 15000,         # 120k samples at batch 8
            "pg.lr": 2e-3,             # LLaMA-2-7B (LLaMA-3-8B: 6e-3)
            "pg.lr_schedule": "cosine",
            "pg.k": 2,
            "pg.batch_size": 8,
            "pg.select": "final",
            "pg.baseline": "ema",      # moving average with weight 1/5, the current step included
            "pg.baseline_window": 5,
            "pg.projection": "reference",  # per kind, unit count, shifted down only; per-kind hard mask
            "pg.per_kind_budget": True,
            "pg.batches": "stream",    # 120k distinct windows, each used once
            "data.calib": "c4",
            "data.seqlen": 128,
        },
    },
}
