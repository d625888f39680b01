"""Distributed sampling: 2 gloo ranks on the CPU give the same probabilities as one process that
takes the same N*K samples (written out here as a plain loop), for the unit policy and the search
policy (whose draws are Gaussian directions), and a failing rank stops the run with an error
instead of a hang."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
import time
import traceback

import pytest
import torch

from pgprune.gating import masked_losses
from pgprune.masks import UnitCosts
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import synthetic_model
from pgprune.budget import project
from pgprune.policy.estimators import BaselineState, get_estimator
from pgprune.config import PGSettings
from pgprune.policy.loop import lr_at, run_policy_gradient, step_generator
from pgprune.metrics.pipeline import run_metric
from pgprune.policy.probabilities import UnitLayout, UnitPolicy, sample_masks
from pgprune.policy.search import SearchPolicy

WORLD = 2
SPARSITY, SEED = 0.3, 5


def _setup():
    model = synthetic_model("llama", seed=0, num_hidden_layers=2)
    costs = UnitCosts.from_adapter(get_adapter(model))
    layout = UnitLayout.build(costs, ("channel", "head"))
    calib = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(1))
    s0 = layout.present.float() * 0.7
    config = PGSettings(steps=4, k=2, batch_size=3, lr=0.05, eval_every=100)
    return model, costs, layout, calib, s0, config


def _make_policy(kind, model, costs, layout, calib, s0):
    if kind == "units":
        return UnitPolicy(s0, layout, costs, SPARSITY)
    r = run_metric(model, calib, "wanda-sp", SPARSITY, ("channel", "head"), "uniform", progress=False)
    policy = SearchPolicy.from_metric(r, get_adapter(model), layout, costs, scale=8.0)
    policy.sigma = 0.5  # large enough that the 4 steps move the hard mask's scores visibly
    return policy


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, fail_rank: int | None, results, kind: str) -> None:
    import torch.distributed as dist

    from pgprune.policy.distributed import TorchWorld

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=20))
        model, costs, layout, calib, s0, config = _setup()

        def loss_fn(model, batch, masks, costs):
            if rank == fail_rank:
                raise RuntimeError(f"rank {rank} fails on purpose")
            return masked_losses(model, batch, masks, costs=costs)

        policy = _make_policy(kind, model, costs, layout, calib, s0)
        result = run_policy_gradient(model, calib, policy, config, seed=SEED, out_dir=out_dir, progress=False,
                                     loss_fn=loss_fn, world=TorchWorld())
        results.put((rank, "ok", result.probs.tolist(), result.history[-1]["forward_passes"]))
    except BaseException as exc:  # report everything to the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(tmp_path, fail_rank=None, timeout=120.0, kind="units"):
    # fork: the ranks inherit the imported torch/transformers (spawn re-imports them, ~4x slower);
    # each rank sets one thread before any work
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), fail_rank, results, kind)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout
    while len(got) < WORLD and time.monotonic() < deadline:
        try:
            item = results.get(timeout=1.0)
            got[item[0]] = item
        except Exception:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung (still alive after the collective should have failed)")
    return got


def _reference(model, costs, layout, calib, s0, config):
    """One process taking rank 0's and rank 1's samples of every step, in rank order."""
    estimator = get_estimator(config.estimator, config.k)
    keep = 1.0 - SPARSITY
    s = project(s0.float(), layout, costs, keep, config.projection, config.per_kind_budget)
    baseline = BaselineState(window=config.baseline_window)
    for step in range(config.steps):
        ms, ls = [], []
        for rank in range(WORLD):
            gen = step_generator(SEED, step, rank)
            idx = torch.randperm(calib.shape[0], generator=gen)[: config.batch_size]
            m = sample_masks(s, config.k, gen)
            ms.append(m)
            ls.append(masked_losses(model, calib[idx], layout.masks(m), costs=costs).float())
        g, _ = estimator(torch.cat(ms), s, torch.cat(ls), baseline)
        s = project(s - lr_at(config, step) * g, layout, costs, keep, config.projection, config.per_kind_budget)
    return s


def _search_reference(model, costs, layout, calib, s0, config):
    """The search policy taking both ranks' antithetic pairs of every step, in rank order: its
    estimate mean_j (L+ - L-) / (2 sigma) eps_j over all pairs, then its Adam step."""
    policy = _make_policy("search", model, costs, layout, calib, s0)
    for step in range(config.steps):
        diffs, eps = [], []
        for rank in range(WORLD):
            gen = step_generator(SEED, step, rank)
            idx = torch.randperm(calib.shape[0], generator=gen)[: config.batch_size]
            m = policy.sample(config.k, gen)
            losses = masked_losses(model, calib[idx], layout.masks(m), costs=costs).double()
            diffs.append(losses[0::2] - losses[1::2])
            eps.append(policy.last_directions)
        g = (torch.cat(diffs)[:, None] * torch.cat(eps)).mean(0) / (2.0 * policy.sigma)
        policy._adam_step(g, lr_at(config, step))
    return policy.probs()


def test_two_ranks_of_the_search_policy_step_on_every_rank_s_pairs(tmp_path):
    got = _launch(tmp_path, kind="search")
    assert set(got) == {0, 1}, got
    for rank, item in got.items():
        assert item[1] == "ok", item[3]
    probs = [torch.tensor(got[r][2]) for r in range(WORLD)]
    assert torch.equal(probs[0], probs[1])
    setup = _setup()
    ref = _search_reference(*setup)
    torch.testing.assert_close(probs[0], ref.float(), rtol=0, atol=1e-6)
    model, costs, layout, calib, s0, config = setup
    single = run_policy_gradient(model, calib, _make_policy("search", *setup[:5]), config, seed=SEED,
                                 progress=False).probs
    assert not torch.allclose(single.float(), ref.float(), atol=1e-4)  # rank 0's pairs alone step elsewhere


def test_two_ranks_match_one_process_with_all_samples(tmp_path):
    got = _launch(tmp_path)
    assert set(got) == {0, 1}, got
    for rank, item in got.items():
        assert item[1] == "ok", item[3]
    s_ranks = [torch.tensor(got[r][2]) for r in range(WORLD)]
    assert torch.equal(s_ranks[0], s_ranks[1])  # every rank applied the identical update
    ref = _reference(*_setup())
    torch.testing.assert_close(s_ranks[0], ref, rtol=0, atol=1e-6)
    config = _setup()[-1]
    assert got[0][3] == config.steps * config.k * WORLD
    # a single process with the same seed differs (it sees only rank 0's samples): the check bites
    model, costs, layout, calib, s0, config = _setup()
    single = run_policy_gradient(model, calib, UnitPolicy(s0, layout, costs, SPARSITY), config, seed=SEED,
                                 progress=False).probs
    assert not torch.allclose(single, ref, atol=1e-6)
    # only rank 0 wrote the log and checkpoint, with the world size in the fingerprint
    assert (tmp_path / "checkpoint.pt").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == config.steps
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["fingerprint"]["world_size"] == WORLD


def test_failing_rank_stops_the_run_without_hanging(tmp_path):
    t0 = time.monotonic()
    got = _launch(tmp_path, fail_rank=1, timeout=90.0)
    assert got[1][1] == "error" and "fails on purpose" in got[1][2]
    assert got[0][1] == "error", "the surviving rank should fail too"
    assert "DistributedError" in got[0][2] and "rank 0/2" in got[0][2], got[0][2]
    assert time.monotonic() - t0 < 90.0


def test_rank_zero_draws_like_a_single_process_and_ranks_differ():
    a = torch.rand(5, generator=step_generator(3, 7))
    assert torch.equal(a, torch.rand(5, generator=step_generator(3, 7, 0)))
    b = torch.rand(5, generator=step_generator(3, 7, 1))
    c = torch.rand(5, generator=step_generator(3, 7, 2))
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert torch.equal(b, torch.rand(5, generator=step_generator(3, 7, 1)))


def test_pgprune_prune_under_torchrun(tmp_path):
    """The real launch path: torchrun starts 2 gloo ranks of `pgprune prune`; rank 0 alone writes the
    run, whose log counts both ranks' samples."""
    import json
    import os
    import subprocess
    import sys

    from conftest import char_tokenizer

    synthetic_model("qwen2", seed=3).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("Structured pruning removes whole channels, heads and layers of a network. " * 60)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "pgprune", "prune", str(tmp_path / "model"),
           "--method", "pg", "--sparsity", "0.25", "--calib", f"text:{text}", "--eval", f"text:{text}",
           "--nsamples", "16", "--seqlen", "32", "--eval-seqlen", "32", "--steps", "3", "--k", "2",
           "--batch-size", "2", "--eval-every", "3", "--track-max-tokens", "256", "--dtype", "fp32", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(os.path.dirname(__file__))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert set(run["perplexity"]) == {"dense", "init", "gated", "pruned"}
    assert run["execution"]["world_size"] == 2 and run["execution"]["forward"] in ("gated", "gathered")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]  # one writer: no duplicated records
    assert log[-1]["forward_passes"] == 3 * 2 * 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["fingerprint"]["world_size"] == 2
    assert (out / "model" / "config.json").is_file()
