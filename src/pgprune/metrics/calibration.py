"""Calibration statistics, collected one decoder layer at a time.

`collect_layer_stats(model, calib_ids)` runs the calibration windows through the model layer by
layer, so that memory holds the model plus one layer's inputs and outputs for all windows:

1. `capture_layer_inputs` runs the model once per mini-batch with every decoder layer replaced by
   a pass-through, recording the hidden states entering layer 0 and the keyword arguments each
   layer receives (rotary embeddings, causal / sliding-window masks, ...). Whatever the family's
   forward passes to its layers is recorded as is, so no family knowledge is needed here.
2. For each layer in turn, the stored inputs are pushed through that layer alone in mini-batches
   while hooks on the inputs of o_proj / down_proj and on the residual stream accumulate
   per-feature statistics (`LayerStats`). The outputs become the next layer's inputs: either the
   dense layer's outputs, or (`propagate="pruned"`, as Wanda and FLAP's uniform variant do) the
   outputs of the layer after an `on_layer` callback has decided what to prune in it.

Module names come from the adapter only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pgprune.errors import ConfigError, DataError
from pgprune.models.adapter import ModelAdapter, execution_device, get_adapter, read_weight

PROPAGATE_CHOICES = ("dense", "pruned")


# --- statistics ----------------------------------------------------------------------------------
@dataclass
class FeatureStats:
    """Running per-feature mean and sum of squared deviations over tokens (float64), and optionally
    the full co-moment matrix (sum of outer products of deviations) that least-squares
    reconstruction needs.

    Batches are merged with Chan et al.'s parallel update, which stays accurate when a feature's
    mean is large compared with its spread (a plain sum / sum-of-squares would cancel). A batch's
    own co-moment is computed in float32 from float32-cast inputs (fp16/bf16 activations cannot
    overflow it) and merged in float64."""

    count: int
    mean: torch.Tensor  # [F] float64
    m2: torch.Tensor  # [F] float64: sum of squared deviations from the mean
    comoment: torch.Tensor | None = None  # [F, F] float64: sum of (x - mean)(x - mean)^T, or None
    # derived values cached until the next update: is_finite()'s verdict, damped_precision() per damping
    _finite: bool | None = field(default=None, repr=False, compare=False)
    _precision: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(cls, features: int, device=None, covariance: bool = False) -> "FeatureStats":
        z = torch.zeros(features, dtype=torch.float64, device=device)
        full = torch.zeros(features, features, dtype=torch.float64, device=device) if covariance else None
        return cls(0, z, z.clone(), full)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        centred = x - mean_b
        m2_b = centred.pow(2).sum(0).double()
        mean_b = mean_b.double()
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (n_a * n_b / n)
        if self.comoment is not None:  # in place: no float64 F x F temporaries
            self.comoment.add_(_gram(centred))
            if n_a:
                self.comoment.addr_(delta, delta, alpha=n_a * n_b / n)
        self.count = n
        self._finite = None
        self._precision = {}

    def is_finite(self) -> bool:
        """Whether mean, m2 and co-moment are all finite; scanned once until the next update (PG's
        per-mask refits read the same statistics thousands of times)."""
        if self._finite is None:
            self._finite = all(t is None or bool(torch.isfinite(t).all()) for t in (self.mean, self.m2, self.comoment))
        return self._finite

    def ridge(self, damp: float) -> float | None:
        """The least-squares ridge: damp x the mean variance of all features (None when every feature
        is constant: nothing to regress on)."""
        scale = float(self.comoment.diagonal().mean()) / max(self.count, 1)
        return damp * scale if scale > 0 else None

    def damped_precision(self, damp: float) -> torch.Tensor:
        """(C + ridge I)^-1 [F, F] float64, computed once per damping and cached (F^2 x 8 bytes more)."""
        if damp not in self._precision:
            self._precision[damp] = torch.cholesky_inverse(damped_cholesky(self.covariance, self.ridge(damp) or 0.0))
        return self._precision[damp]

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance per feature (denominator count - 1)."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        """Mean of x^2 per feature: ||X_j||^2 / tokens."""
        return self.m2 / max(self.count, 1) + self.mean.pow(2)

    @property
    def covariance(self) -> torch.Tensor:
        """[F, F] population covariance (denominator count); needs `covariance=True` collection."""
        if self.comoment is None:
            raise ConfigError("these statistics hold no covariance; collect them with covariance=True")
        return self.comoment / max(self.count, 1)

    def to(self, device) -> "FeatureStats":
        return FeatureStats(self.count, self.mean.to(device), self.m2.to(device),
                            None if self.comoment is None else self.comoment.to(device))

    def without_covariance(self) -> "FeatureStats":
        return FeatureStats(self.count, self.mean, self.m2)


def _gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """x^T x for x [tokens, F], computing only the blocks on and below the diagonal and mirroring them:
    about 0.6 of the full product's work (the covariance update dominates a least-squares walk)."""
    f = x.shape[1]
    step = -(-f // blocks)
    if f < 256:  # small: one product is as fast
        return x.T @ x
    out = torch.empty(f, f, dtype=x.dtype, device=x.device)
    for start in range(0, f, step):
        end = min(start + step, f)
        rows = x[:, start:end].T @ x[:, :end]  # block row, columns up to the diagonal
        out[start:end, :end] = rows
        out[:start, start:end] = rows[:, :start].T
    return out


def damped_cholesky(c: torch.Tensor, lam: float) -> torch.Tensor:
    """The Cholesky factor of c + lam I, the damping raised where c is numerically singular (lam 0)."""
    scale = float(c.diagonal().mean())
    for _ in range(8):
        chol, failed = torch.linalg.cholesky_ex(c + lam * torch.eye(len(c), dtype=c.dtype, device=c.device))
        if not int(failed):
            return chol
        lam = max(lam * 10, 1e-8 * scale, 1e-12)
    raise DataError("the calibration covariance of a projection's inputs is not positive definite even with "
                    "strong damping; check the calibration text")


@dataclass
class LayerStats:
    """What one decoder layer saw on the calibration windows.

    attn_in / mlp_in: statistics of the inputs of o_proj / down_proj (None if the block is absent).
    cos_*: sum over tokens of the cosine similarity between the residual stream before and after
    the attention block, the MLP block and the whole layer (ShortGPT's block influence)."""

    layer: int
    tokens: int
    attn_in: FeatureStats | None
    mlp_in: FeatureStats | None
    cos_attn: float
    cos_mlp: float
    cos_layer: float

    def mean_cos(self, block: str) -> float:
        return {"attn": self.cos_attn, "mlp": self.cos_mlp, "layer": self.cos_layer}[block] / max(self.tokens, 1)


@dataclass
class LayerEdit:
    """What to remove from one layer while propagating calibration data (`propagate="pruned"`).

    head_keep: [G] bool over KV-head groups; channel_keep: [I] bool over MLP channels (None: keep
    all). attn_bias / mlp_bias: [hidden] vectors added to the outputs of o_proj / down_proj
    (FLAP's compensation). A block with nothing kept is removed; its compensation vector stays
    as a constant added to the residual stream (as `pgprune.surgery.remove_units` does).
    attn_weight / mlp_weight: [hidden, in_features] weights o_proj / down_proj compute with instead
    of their own (least-squares reconstruction; only the kept columns matter)."""

    head_keep: torch.Tensor | None = None
    channel_keep: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None
    mlp_bias: torch.Tensor | None = None
    attn_weight: torch.Tensor | None = None
    mlp_weight: torch.Tensor | None = None


# --- inputs of the first layer ---------------------------------------------------------------------
@contextlib.contextmanager
def _forwards_replaced(replacements: dict[nn.Module, Callable]):
    """Within the context, each module's `forward` is the given function (an instance attribute, so
    an accelerate hook's own replacement is put back afterwards too)."""
    saved = {}
    try:
        for module, forward in replacements.items():
            saved[module] = module.__dict__.get("forward")
            module.forward = forward
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering layer 0 for all windows, and per mini-batch the keyword arguments
    every layer receives (tensors shared between layers are stored once)."""

    hidden: torch.Tensor  # [N, T, H]
    batches: list[slice]
    kwargs: list[list[dict[str, Any]]]  # [batch][layer] -> kwargs


def check_calibration_ids(calib_ids: torch.Tensor, adapter: ModelAdapter) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2:
        raise DataError("calibration windows must be a LongTensor [nsamples, seqlen] of token ids; "
                        "get them from pgprune.data.get_calibration_windows(...)")
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise DataError(f"calibration windows must hold integer token ids, got dtype {calib_ids.dtype}")
    if calib_ids.numel() == 0:
        raise DataError("calibration windows are empty; ask for at least one window of at least one token")
    vocab = getattr(adapter.config, "vocab_size", None)
    if vocab is not None and (int(calib_ids.max()) >= vocab or int(calib_ids.min()) < 0):
        raise DataError(f"calibration token ids fall outside the model's vocabulary [0, {vocab}); "
                        "were the windows made with this model's tokenizer?")
    return calib_ids.long()


def _batches(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calib_ids: torch.Tensor, *, batch_size: int = 8,
                         storage_device: torch.device | str | None = None,
                         adapter: ModelAdapter | None = None) -> LayerInputs:
    """Run the model with pass-through decoder layers and record what enters each layer."""
    adapter = adapter or get_adapter(model)
    calib_ids = check_calibration_ids(calib_ids, adapter)
    layers = adapter.decoder_layers()
    n_layers = len(layers)
    device = execution_device(adapter.embed_tokens())
    storage = torch.device(storage_device) if storage_device is not None else device

    batches = _batches(calib_ids.shape[0], batch_size)
    hidden: torch.Tensor | None = None
    all_kwargs: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []

    def passthrough(index: int):
        def forward(hidden_states, *args, **kwargs):
            if args:  # positional extras are not expected from the families we support
                raise ConfigError("a decoder layer received positional arguments besides the hidden "
                                  "states; layer-by-layer calibration does not support this family yet")
            kwargs = dict(kwargs)
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            kwargs["use_cache"] = False
            current.append(kwargs)
            if index == 0:
                current_hidden.append(hidden_states)
            return hidden_states
        return forward

    def stop(_module, _args):
        raise _StopForward

    current_hidden: list[torch.Tensor] = []
    handle = adapter.final_norm().register_forward_pre_hook(stop)
    try:
        with _forwards_replaced({layer: passthrough(i) for i, layer in enumerate(layers)}):
            for b in batches:
                current, current_hidden = [], []
                try:
                    model(input_ids=calib_ids[b].to(device), use_cache=False)
                except _StopForward:
                    pass
                if len(current) != n_layers or len(current_hidden) != 1:
                    raise ConfigError(f"expected each of the {n_layers} decoder layers to be called once "
                                      f"per forward pass, saw {len(current)} calls")
                h = current_hidden[0]
                if hidden is None:
                    hidden = torch.empty(calib_ids.shape[0], *h.shape[1:], dtype=h.dtype, device=storage)
                hidden[b] = h.to(storage)
                all_kwargs.append(current)
    finally:
        handle.remove()
    assert hidden is not None
    return LayerInputs(hidden=hidden, batches=batches, kwargs=all_kwargs)


# --- the layer walk --------------------------------------------------------------------------------
def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def hidden_states_of(out: Any) -> torch.Tensor:
    """A decoder layer's (or projection hook's) output tensor: transformers versions return a tuple or a tensor."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).double().sum())


def _layer_device(layer: nn.Module, fallback: torch.device) -> torch.device:
    return execution_device(layer) if next(layer.parameters(), None) is not None else fallback


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    propagate: str = "dense",
    on_layer: Callable[[int, LayerStats], LayerEdit | None] | None = None,
    storage_device: torch.device | str | None = None,
    progress: bool = True,
    adapter: ModelAdapter | None = None,
    covariance: bool = False,
) -> list[LayerStats]:
    """Per-layer calibration statistics, one decoder layer at a time.

    on_layer(i, stats_i) is called once the statistics of layer i are complete; with
    propagate="pruned" the `LayerEdit` it returns is applied to layer i (through temporary hooks,
    the weights are not touched) before its outputs are computed for layer i+1. With
    propagate="dense" the outputs of the unmodified layer are passed on and the return value of
    on_layer is ignored. covariance: also accumulate the full input covariance of o_proj / down_proj
    (`FeatureStats.comoment`, float64: in_features^2 x 8 bytes per projection and layer; an on_layer
    callback may drop it once used, see `FeatureStats.without_covariance`)."""
    if propagate not in PROPAGATE_CHOICES:
        raise ConfigError(f"propagate must be one of {', '.join(PROPAGATE_CHOICES)}, got {propagate!r}")
    adapter = adapter or get_adapter(model)
    stats: list[LayerStats] = []
    for i, mods, dev, inps, outs, inputs in _walk(model, calib_ids, adapter.num_layers, adapter=adapter,
                                                  batch_size=batch_size, storage_device=storage_device,
                                                  desc="calibration (layer by layer)" if progress else None):
        st = _layer_pass(mods, i, inps, outs, inputs, dev, collect=True, covariance=covariance)
        edit = on_layer(i, st) if on_layer is not None else None
        if propagate == "pruned" and edit is not None:
            handles = apply_layer_edit(mods, adapter, edit)
            try:
                _layer_pass(mods, i, inps, outs, inputs, dev, collect=False)
            finally:
                for h in handles:
                    h.remove()
        stats.append(st)
    return stats


@torch.no_grad()
def collect_removed_run_stats(model: nn.Module, calib_ids: torch.Tensor, runs: dict[int, int], *,
                              batch_size: int = 8, storage_device: torch.device | str | None = None,
                              adapter: ModelAdapter | None = None, progress: bool = True) -> dict[int, FeatureStats]:
    """{p: joint statistics (with covariance) of [x_p, delta_p]} over the calibration tokens, for each
    kept layer p followed by a run of removed layers p+1 .. runs[p]: x_p is the input of p's down_proj
    and delta_p = h_{runs[p]} - h_p what the removed layers add to the residual stream, both from the
    dense model. Least squares regresses delta_p on x_p (`reconstruction`). Memory beyond a walk:
    x_p of every window (tokens x intermediate, on the storage device), one copy of h_p and the joint
    float64 covariance ((intermediate + hidden)^2 x 8 bytes), one run at a time."""
    out: dict[int, FeatureStats] = {}
    if not runs:
        return out
    held = None  # (p, x_p per batch, h_p)
    for i, mods, dev, inps, outs, inputs in _walk(model, calib_ids, max(runs.values()) + 1, adapter=adapter,
                                                  batch_size=batch_size, storage_device=storage_device,
                                                  desc="removed layers' updates" if progress else None):
        xs: list[torch.Tensor] = []
        hook = None
        if i in runs:  # x_p of every window, kept until the run's end
            hook = mods.down_proj.register_forward_pre_hook(
                lambda _m, args: xs.append(args[0].detach().to(inps.device)))
        try:
            _layer_pass(mods, i, inps, outs, inputs, dev, collect=False)
        finally:
            if hook is not None:
                hook.remove()
        if i in runs:
            held = (i, xs, outs.clone())
        if held is not None and runs[held[0]] == i:
            p, xs_p, h_p = held
            fs = FeatureStats.empty(xs_p[0].shape[-1] + inps.shape[-1], dev, covariance=True)
            for b, x in zip(inputs.batches, xs_p):
                delta = (outs[b] - h_p[b]).to(dev)
                fs.update(torch.cat([x.to(dev).flatten(0, -2).float(), delta.flatten(0, -2).float()], -1))
            out[p] = fs
            held = None
    return out


@torch.no_grad()
def collect_residual_stream(model: nn.Module, calib_ids: torch.Tensor, *, batch_size: int = 8,
                            storage_device: torch.device | str | None = None, adapter: ModelAdapter | None = None,
                            progress: bool = True) -> tuple[list[torch.Tensor], LayerInputs]:
    """(stream, inputs): the dense model's residual stream on the calibration windows, stream[i] what
    enters layer i and stream[L] what leaves the last one ([N, T, H] each, on the storage device), and
    the walk's `LayerInputs` (their keyword arguments rerun a single layer: `down_proj_inputs`).
    Memory beyond a walk: (L + 1) x N x T x H in the model dtype."""
    adapter = adapter or get_adapter(model)
    stream: list[torch.Tensor] = []
    for i, mods, dev, inps, outs, inputs in _walk(model, calib_ids, adapter.num_layers, adapter=adapter,
                                                  batch_size=batch_size, storage_device=storage_device,
                                                  desc="residual stream" if progress else None):
        stream.append(inps.clone())
        _layer_pass(mods, i, inps, outs, inputs, dev, collect=False)
        last = outs
    stream.append(last.clone())
    return stream, inputs


@torch.no_grad()
def down_proj_inputs(adapter: ModelAdapter, i: int, layer_input: torch.Tensor,
                     inputs: LayerInputs) -> list[torch.Tensor]:
    """Layer i's down_proj inputs, one [B, T, I] tensor per window batch of `inputs`, from what enters
    the layer (`collect_residual_stream`), on the storage device."""
    mods = adapter.layer(i)
    if mods.down_proj is None:
        raise ConfigError(f"layer {i} has no MLP: it has no down_proj inputs")
    xs: list[torch.Tensor] = []
    hook = mods.down_proj.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach().to(layer_input.device)))
    try:
        _layer_pass(mods, i, layer_input, torch.empty_like(layer_input), inputs,
                    _layer_device(mods.layer, layer_input.device), collect=False)
    finally:
        hook.remove()
    return xs


@torch.no_grad()
def collect_block_stats_sequentially(
    model: nn.Module,
    calib_ids: torch.Tensor,
    on_block: Callable[[int, str, FeatureStats | None], LayerEdit | None],
    *,
    batch_size: int = 8,
    storage_device: torch.device | str | None = None,
    progress: bool = True,
    adapter: ModelAdapter | None = None,
    own_attention: Callable[[int], bool] = lambda i: False,
    run_outputs: dict[int, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] | None = None,
) -> int:
    """Sequential statistics block by block, with covariance: the statistics of layer i's o_proj
    inputs are read from the model whose layers before i are edited, those of its down_proj inputs
    from the model whose attention block of layer i is edited too (SparseGPT's "true sequential"
    order), except where own_attention(i): then with layer i's attention block as it is (a removed
    layer's MLP mean is the mean of what the whole unedited layer adds to the stream that enters it;
    its edit still applies to the layer's output). run_outputs {p: (j, f)}: f of layer p's down_proj
    inputs (one window batch) is added to layer j's output (a removed run's regression: the removed
    layers p+1 .. j read the stream without it, the layers after j with it; memory: one stream copy
    per open run). on_block(i, "attn" | "mlp", stats) returns the
    `LayerEdit` of that block (its fields for the other block are ignored; None: unedited) and is
    called for the attention block first; stats is None where surgery removed the block. Returns the
    number of calibration tokens.

    Each part of a layer runs once per window batch: the attention block up to o_proj (its inputs
    kept), then the layer again with the attention module standing in with the edited o_proj of
    those inputs, up to down_proj (its inputs kept), then the layer with both modules standing in
    with their edited projections, which gives the layer's edited output. Standing in assumes the
    attention / MLP module returns its o_proj / down_proj output, as LLaMA-family layers do; it is
    checked on the first window batch of each kind of layer. Memory beyond a walk: the o_proj and
    down_proj inputs of every window (tokens x (attention width + intermediate)) on the storage device."""
    adapter = adapter or get_adapter(model)
    tokens = 0
    run_outputs = run_outputs or {}
    pending: dict[int, list[torch.Tensor]] = {}  # layer j -> what is added to its output (run_outputs)
    checked: dict[tuple, dict[str, int]] = {}  # per layer class and blocks present: the modules' output arity
    for i, mods, dev, inps, outs, inputs in _walk(model, calib_ids, adapter.num_layers, adapter=adapter,
                                                  batch_size=batch_size, storage_device=storage_device,
                                                  desc="sequential refit (block by block)" if progress else None):
        kwargs = [kw[i] for kw in inputs.kwargs]
        kind = (type(mods.layer), mods.o_proj is None, mods.down_proj is None)
        if kind not in checked:
            checked[kind] = _check_stand_ins(mods, inps[inputs.batches[0]].to(dev), _to(kwargs[0], dev))
        arity = checked[kind]
        stand_ins: dict[str, Callable[[slice], torch.Tensor]] = {}  # block -> output of a window batch
        unedited: dict[str, Callable[[slice], torch.Tensor]] = {}  # the same, through the block's own projection
        current: list[slice] = []  # the window batch being run
        held: dict[str, torch.Tensor] = {}
        for block, proj in (("attn", mods.o_proj), ("mlp", mods.down_proj)):
            if proj is None:
                on_block(i, block, None)
                continue
            fs = FeatureStats.empty(proj.in_features, dev, covariance=True)
            held[block] = torch.empty(*inps.shape[:-1], proj.in_features, dtype=inps.dtype, device=inps.device)
            reading = {**stand_ins, **unedited} if block == "mlp" and own_attention(i) else stand_ins
            with _standing_in(mods, arity, reading, current):
                for b, kw in zip(inputs.batches, kwargs):
                    current[:] = [b]
                    x = _input_of(proj, mods.layer, inps[b].to(dev), _to(kw, dev))
                    fs.update(x)
                    held[block][b] = x.to(held[block].device)
            tokens = fs.count
            edit = on_block(i, block, fs) or LayerEdit()
            project = _edited_projections(mods, adapter, edit).get(block, proj)
            stand_ins[block] = lambda b, x=held[block], project=project: project(x[b].to(dev))
            unedited[block] = lambda b, x=held[block], proj=proj: proj(x[b].to(dev))
        if i in run_outputs and "mlp" in held:
            j, f = run_outputs[i]
            added = torch.empty_like(inps)
            for b in inputs.batches:
                added[b] = f(held["mlp"][b].to(dev)).to(added.device, added.dtype)
            pending.setdefault(j, []).append(added)
        with _standing_in(mods, arity, stand_ins, current):
            for b, kw in zip(inputs.batches, kwargs):
                current[:] = [b]
                y = hidden_states_of(mods.layer(inps[b].to(dev), **_to(kw, dev)))
                for added in pending.get(i, ()):
                    y = y + added[b].to(dev)
                outs[b] = y.to(outs.device)
        pending.pop(i, None)
    return tokens


def _input_of(proj: nn.Module, layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """What `proj` receives when `layer` runs on x (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def stop(_m, args):
        seen.append(args[0])
        raise _StopForward

    handle = proj.register_forward_pre_hook(stop)
    try:
        layer(x, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ConfigError("a projection was not called exactly once in its layer's forward pass")
    return seen[0]


def _check_stand_ins(mods, x: torch.Tensor, kwargs: dict) -> dict[str, int]:
    """{"attn"|"mlp": the length of the module's output tuple (0: a tensor)}, after checking on x that
    the attention / MLP module returns its o_proj / down_proj output as is (what standing in needs)."""
    seen: dict[str, Any] = {}
    pairs = [(b, m, p) for b, m, p in (("attn", mods.attn, mods.o_proj), ("mlp", mods.mlp, mods.down_proj))
             if p is not None]
    handles = []
    for block, module, proj in pairs:
        handles.append(module.register_forward_hook(lambda _m, _a, out, b=block: seen.__setitem__(b, out)))
        handles.append(proj.register_forward_hook(lambda _m, _a, out, b=block: seen.__setitem__(b + "_proj", out)))
    try:
        mods.layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    arity = {}
    for block, _module, _proj in pairs:
        out = seen.get(block)
        if out is None or hidden_states_of(out) is not seen.get(block + "_proj"):
            raise ConfigError(f"this family's {block} module does not return its "
                              f"{'o_proj' if block == 'attn' else 'down_proj'} output as is; the block-by-block "
                              "sequential refit cannot stand in for it: use --reconstruct-inputs dense")
        arity[block] = len(out) if isinstance(out, (tuple, list)) else 0
    return arity


@contextlib.contextmanager
def _standing_in(mods, arity: dict[str, int], stand_ins: dict[str, Callable[[slice], torch.Tensor]],
                 current: list[slice]):
    """Within the context, the attention / MLP module of `mods` named in `stand_ins` does not compute:
    it returns `stand_ins[block](current[0])` (shaped as its own output, `arity`), for the window
    batch `current[0]` being run; the rest of the layer (norms, residual additions) runs as written."""
    modules = {"attn": mods.attn, "mlp": mods.mlp}

    def stand_in(output_of: Callable[[slice], torch.Tensor], n: int) -> Callable:
        def forward(*_args, **_kwargs):
            out = output_of(current[0])
            return (out,) + (None,) * (n - 1) if n else out
        return forward

    with _forwards_replaced({modules[b]: stand_in(f, arity[b]) for b, f in stand_ins.items()}):
        yield


def _walk(model: nn.Module, calib_ids: torch.Tensor, n_layers: int, *, adapter: ModelAdapter | None,
          batch_size: int, storage_device, desc: str | None) -> Iterator[tuple]:
    """The layer walk: captures what enters layer 0, then yields (i, mods, device, inps, outs, inputs)
    for layers 0 .. n_layers-1; the caller pushes `inps` through layer i into `outs`, which become the
    next layer's inputs (two buffers, swapped). desc: a progress bar's title (None: no bar)."""
    adapter = adapter or get_adapter(model)
    inputs = capture_layer_inputs(model, calib_ids, batch_size=batch_size, storage_device=storage_device,
                                  adapter=adapter)
    inps = inputs.hidden
    outs = torch.empty_like(inps)
    iterator: Iterator[int] = range(n_layers)
    if desc is not None:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, unit="layer")
    for i in iterator:
        mods = adapter.layer(i)
        yield i, mods, _layer_device(mods.layer, inps.device), inps, outs, inputs
        inps, outs = outs, inps


def _layer_pass(mods, i: int, inps: torch.Tensor, outs: torch.Tensor, inputs: LayerInputs,
                dev: torch.device, *, collect: bool, covariance: bool = False) -> LayerStats:
    """Push all windows through layer i; write its outputs to `outs`; optionally collect stats."""
    attn_stats = mlp_stats = None
    cos = {"attn": 0.0, "mlp": 0.0, "layer": 0.0}
    tokens = 0
    handles = []
    mid: list[torch.Tensor] = []
    if collect:
        if mods.o_proj is not None:
            attn_stats = FeatureStats.empty(mods.o_proj.in_features, dev, covariance)
            handles.append(mods.o_proj.register_forward_pre_hook(
                lambda _m, args: attn_stats.update(args[0])))
        if mods.down_proj is not None:
            mlp_stats = FeatureStats.empty(mods.down_proj.in_features, dev, covariance)
            handles.append(mods.down_proj.register_forward_pre_hook(
                lambda _m, args: mlp_stats.update(args[0])))
        # The residual stream between the two blocks is the input of the post-attention norm.
        handles.append(mods.post_attention_norm.register_forward_pre_hook(
            lambda _m, args: mid.append(args[0])))
    try:
        for b, kwargs in zip(inputs.batches, inputs.kwargs):
            x = inps[b].to(dev)
            mid.clear()
            y = hidden_states_of(mods.layer(x, **_to(kwargs[i], dev)))
            outs[b] = y.to(outs.device)
            if collect:
                tokens += x.shape[0] * x.shape[1]
                cos["layer"] += _cos_sum(x, y)
                if len(mid) == 1:
                    cos["attn"] += _cos_sum(x, mid[0])
                    cos["mlp"] += _cos_sum(mid[0], y)
    finally:
        for h in handles:
            h.remove()
    return LayerStats(layer=i, tokens=tokens, attn_in=attn_stats, mlp_in=mlp_stats,
                      cos_attn=cos["attn"], cos_mlp=cos["mlp"], cos_layer=cos["layer"])


class EditedProjection:
    """One projection (o_proj or down_proj) under an edit: only its `keep` inputs read (None: all; none
    kept: the block is removed and outputs zeros), an output `bias` added, and optionally refit kept
    columns `weight` [out, in_features] computing instead of its own. Serves as a pair of hooks
    (`mask_input` before the module, `finish` after it: `apply_layer_edit`) or, called, as the edited
    projection of an input (one linear map, not the module's and then the refit's)."""

    def __init__(self, proj: nn.Module, keep: torch.Tensor | None, bias: torch.Tensor | None,
                 weight: torch.Tensor | None):
        dev = execution_device(proj)  # not proj.weight.device: "meta" while a device_map offloads it
        self.proj = proj
        self.feat = None if keep is None else keep.to(dev)
        self.empty = self.feat is not None and not bool(self.feat.any())
        self.add = None if bias is None else bias.to(dev, proj.weight.dtype)
        self.refit = None if weight is None or self.empty else weight.to(dev, proj.weight.dtype)
        self.refit_bias = None if self.refit is None or proj.bias is None else read_weight(proj, "bias")

    def mask_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.feat is None or self.empty else x * self.feat.to(x.dtype)

    @property
    def replaces_module(self) -> bool:
        """Whether the module's own output is discarded (a removed block, or refit columns)."""
        return self.empty or self.refit is not None

    def finish(self, x_masked: torch.Tensor, output: torch.Tensor | None) -> torch.Tensor:
        """The edited output from the module's output on the masked input (None where it is not
        needed: `replaces_module`)."""
        if self.empty:  # the block is removed as a whole: only a compensation constant remains
            output = x_masked.new_zeros(*x_masked.shape[:-1], self.proj.out_features)
        elif self.refit is not None:
            output = torch.nn.functional.linear(x_masked, self.refit, self.refit_bias)
        return output if self.add is None else output + self.add

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mask_input(x)
        return self.finish(x, None if self.replaces_module else self.proj(x))


def _edited_projections(mods, adapter: ModelAdapter, edit: LayerEdit) -> dict[str, EditedProjection]:
    """{"attn"|"mlp": the edited o_proj / down_proj} for the blocks `edit` touches."""
    head_features = None if edit.head_keep is None else adapter.expand_head_mask(edit.head_keep, "o")
    out = {}
    for block, proj, keep, bias, weight in (
        ("attn", mods.o_proj, head_features, edit.attn_bias, edit.attn_weight),
        ("mlp", mods.down_proj, edit.channel_keep, edit.mlp_bias, edit.mlp_weight),
    ):
        if proj is not None and not (keep is None and bias is None and weight is None):
            out[block] = EditedProjection(proj, keep, bias, weight)
    return out


def apply_layer_edit(mods, adapter: ModelAdapter, edit: LayerEdit) -> list:
    """Temporary hooks that make layer `mods` behave as if `edit` had been applied by surgery:
    removed units contribute nothing, compensation biases are added, empty blocks vanish."""
    handles = []
    for ep in _edited_projections(mods, adapter, edit).values():
        if ep.feat is not None and not ep.empty:
            handles.append(ep.proj.register_forward_pre_hook(
                lambda _m, args, ep=ep: (ep.mask_input(args[0]),) + tuple(args[1:])))
        # args: the input after the masking pre-hook
        handles.append(ep.proj.register_forward_hook(lambda _m, args, output, ep=ep: ep.finish(args[0], output)))
    return handles
