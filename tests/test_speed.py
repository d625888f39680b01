"""Speed measurement: paired, interleaved ratios (checked with a scripted clock), a decode loop that
really is greedy cached decoding, and a stable output schema."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.evaluate import speed
from pgprune.evaluate.speed import (SCHEMA_KEYS, compare_speed, format_speed_table, machine_info,
                                    measure_speed, param_bytes)
from pgprune.models.synthetic import synthetic_model


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ScriptedModel(torch.nn.Module):
    """Each forward advances the shared clock by a scripted amount: run i's prefill takes
    prefill[i] seconds and its decode steps add up to decode[i] seconds."""

    def __init__(self, name, clock, log, prefill, decode, new_tokens, n_params=10, vocab=17):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n_params))
        self.config = SimpleNamespace(vocab_size=vocab)
        self.name, self.clock, self.log = name, clock, log
        self.prefill, self.decode, self.new_tokens = prefill, decode, new_tokens
        self.run = -1

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=None):
        if past_key_values is None:
            self.run += 1
            self.log.append(self.name)
            self.clock.t += self.prefill[self.run]
        else:
            self.clock.t += self.decode[self.run] / self.new_tokens
        b, n = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(b, n, self.config.vocab_size), past_key_values=("kv",))


def test_ratios_are_medians_of_paired_measurements():
    clock, log, n = Clock(), [], 4
    # run 0 is the warm-up (its huge times must be ignored); then 3 timed repeats
    dense = ScriptedModel("dense", clock, log, prefill=[99, 1.0, 10.0, 100.0], decode=[99, 3.0, 30.0, 8.0],
                          new_tokens=n, n_params=40)
    pruned = ScriptedModel("pruned", clock, log, prefill=[99, 0.5, 2.0, 100.0], decode=[99, 1.0, 20.0, 8.0],
                           new_tokens=n, n_params=30)
    cmp = compare_speed({"dense": dense, "pruned": pruned}, batch_size=2, prompt_len=8, new_tokens=n,
                        warmup=1, repeats=3, timer=clock)
    r = cmp.ratios["pruned"]
    # per-repeat prefill speed-ups 2, 5, 1 -> median 2 (the ratio of medians would be 10/2 = 5)
    assert r["prefill_speedup_per_repeat"] == pytest.approx([2.0, 5.0, 1.0])
    assert r["prefill_speedup"] == pytest.approx(2.0)
    # decode speed-ups 3, 1.5, 1 -> 1.5 (ratio of medians: 8/8 = 1)
    assert r["decode_speedup"] == pytest.approx(1.5)
    assert r["latency_ratio"] == pytest.approx(statistics.median([1 / 3, 20 / 30, 1.0]))
    assert r["param_bytes_ratio"] == pytest.approx(30 / 40)
    assert cmp.ratios["dense"]["prefill_speedup"] == pytest.approx(1.0)
    # per-model numbers are medians of per-repeat throughputs
    res = cmp.results["dense"]
    assert res.prefill_s == pytest.approx([1.0, 10.0, 100.0])
    assert res.prefill_tokens_per_s == pytest.approx(2 * 8 / 10.0)
    assert res.decode_tokens_per_s == pytest.approx(2 * n / 8.0)
    assert res.latency_ms_per_token == pytest.approx(1000 * 8.0 / n)
    # interleaved: every repeat runs both models, with the first one rotating
    assert log == ["dense", "pruned"] + [m for rep in cmp.order for m in rep]
    assert cmp.order == [["pruned", "dense"], ["dense", "pruned"], ["pruned", "dense"]]


def test_comparison_errors():
    m = synthetic_model("llama", seed=0)
    with pytest.raises(ConfigError, match="baseline"):
        compare_speed({"a": m}, baseline="b")
    with pytest.raises(ConfigError, match="at least one"):
        compare_speed({})
    for bad in ({"repeats": 0}, {"new_tokens": 0}, {"prompt_len": -1}, {"batch_size": 1.5}):
        with pytest.raises(ConfigError):
            measure_speed(m, **bad)


def test_decode_loop_is_greedy_cached_generation():
    model = synthetic_model("llama", seed=1, vocab_size=64)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    _, _, tokens = speed._one_run(model, ids, 6, timer=lambda: 0.0, sync=lambda: None, logits_to_keep=True)
    # reference without a cache: recompute the whole sequence each step
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(7):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(tokens, seq[:, 12:])


def test_measure_speed_on_a_tiny_model_schema_and_memory():
    model = synthetic_model("llama", seed=0)
    res = measure_speed(model, name="tiny", batch_size=2, prompt_len=16, new_tokens=4, warmup=1, repeats=3)
    d = res.to_dict()
    assert tuple(d) == SCHEMA_KEYS
    assert d["repeats"] == 3 and len(d["prefill_s"]) == len(d["decode_s"]) == 3
    assert d["prefill_tokens_per_s"] > 0 and d["decode_tokens_per_s"] > 0
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert d["param_bytes"] == nbytes and d["num_params"] == sum(p.numel() for p in model.parameters())
    assert d["dtype"] == "float32" and d["device"] == "cpu"
    if d["memory_method"] == "cpu_peak_rss":
        assert d["peak_memory_bytes"] >= d["working_memory_bytes"] >= 0
    json.dumps(d)
    table = format_speed_table(res)
    assert "tiny" in table and "prefill tok/s" in table


def test_compare_on_real_models_schema():
    dense = synthetic_model("llama", seed=0)
    small = synthetic_model("llama", seed=0, intermediate_size=32)
    cmp = compare_speed({"dense": dense, "small": small}, prompt_len=8, new_tokens=2, warmup=0, repeats=2)
    d = cmp.to_dict()
    assert set(d) == {"kind", "baseline", "interleaved", "order", "results", "ratios"}
    assert set(d["ratios"]["small"]) == {"prefill_speedup", "decode_speedup", "latency_ratio",
                                         "param_bytes_ratio", "working_memory_ratio", "peak_memory_ratio",
                                         "prefill_speedup_per_repeat", "decode_speedup_per_repeat"}
    assert d["ratios"]["small"]["param_bytes_ratio"] == pytest.approx(
        param_bytes(small)[0] / param_bytes(dense)[0])
    assert "speed-up over dense" in format_speed_table(cmp)
    json.dumps(d)
    info = machine_info()
    assert {"platform", "cpu_count", "torch", "transformers"} <= set(info)


def test_shared_weights_counted_once():
    model = synthetic_model("llama", seed=0)
    model.lm_head.weight = model.model.embed_tokens.weight
    nbytes, count = param_bytes(model)
    assert count == sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates
    assert nbytes == count * 4


def test_cli_bench_vs_dense(tmp_path, capsys, tokenizer):
    from pgprune.cli import main

    dense = synthetic_model("llama", seed=0)
    small = synthetic_model("llama", seed=0, intermediate_size=32)
    for name, m in (("dense", dense), ("small", small)):
        m.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "b.json"
    rc = main(["bench", str(tmp_path / "small"), "--vs", str(tmp_path / "dense"), "--prompt-len", "8",
               "--new-tokens", "2", "--warmup", "0", "--repeats", "2", "--dtype", "fp32", "--device", "cpu",
               "--json", str(out)])
    assert rc == 0
    assert "speed-up over" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["schema"] == "pgprune.eval/1" and d["baseline"] == str(tmp_path / "dense")
    assert d["speed"]["baseline"] == str(tmp_path / "dense")
    assert d["speed"]["ratios"][str(tmp_path / "small")]["param_bytes_ratio"] < 1
    assert d["zeroshot"] is None and d["perplexity"] is None
