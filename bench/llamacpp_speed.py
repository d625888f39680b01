"""Speed where users run it: dense vs pruned SmolLM2-135M in llama.cpp (llama-cpp-python), and how much
f16 / q8_0 / q4_0 move the perplexity against f32.

Models: the dense model and wanda-sp masks at each --sparsities (bias compensation, `--width-multiple
32` so every row length quantizes to q8_0 / q4_0), pruned by `pgprune.pruning.prune` (as `pgprune
prune --method wanda-sp --width-multiple 32 --reconstruct bias`) into --work, exported with
`pgprune.gguf_export.export_gguf` (`pgprune export --outtype T`): f32, f16 and q8_0 by pgprune's
writer, q4_0 (and any other llama.cpp type in --types) by llama.cpp's own quantizer from an f32 file
(`llama_model_quantize`, default parameters: what `llama-quantize F32.gguf Q4_0.gguf Q4_0` writes).

Speed: every model is loaded once (CPU, --threads for both batch and single-token evaluation). A
round measures, for each model in turn (the order rotates from round to round), prompt processing:
the --prompt tokens of WikiText-2 test text evaluated as one batch from an empty KV cache, and
generation: the next --gen tokens of the same text fed one at a time with the cache (teacher-forced,
so every model does the same work). Times are wall clock around llama-cpp-python's `eval` (its
decode calls; no logits are copied out, `logits_all=False`). tokens/s are medians over rounds; a speed-up is the median over
rounds of the pruned model's rate / the dense model's of the same type in that round.

Ideal speed-ups, from the GGUF files: prefill by FLOPs (2 x matmul weights per prompt token, plus the
attention scores and weighted sums, 4 x context x heads x head_dim per layer at each position, plus
the LM head for the last position), generation by bytes read per token (every matmul weight at its
stored type, the LM head included, plus the K and V cache at the mean context, f16).
efficiency = measured / ideal.

With --torch-dtype (default fp32) the same models are also timed in pgprune's PyTorch forward
(`pgprune.evaluate.speed.compare_speed`: random prompt ids of the same length, the same number of
cached decode steps, interleaved, same threads) after the llama.cpp rounds, for the speed-ups side by
side; their ideal uses the f32 GGUF's FLOPs and bytes.

Perplexity: WikiText-2 test, the first --ppl-tokens tokens (pgprune's tokenizer), windows of
--ppl-seqlen from an empty cache (pgprune.evaluate.llamacpp, DESIGN.md protocol), each type against
the f32 file of the same model.

    python bench/llamacpp_speed.py --data-dir /work/shared/data      # what bench/RESULTS.md reports

Writes bench/results/llamacpp_speed.json and prints the tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, command_line, machine, table  # noqa: E402
from pgprune import atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def prune_model(sparsity: float, work: Path, args) -> Path:
    """A wanda-sp + bias-compensation model with MLP widths in multiples of --width-multiple (cached)."""
    from pgprune.config import RunSettings
    from pgprune.pruning import prune

    out = work / f"wanda-sp_{sparsity:g}_w{args.width_multiple}"
    if (out / "run.json").is_file():
        return out / "model"
    settings = RunSettings.from_recipe("features", {
        "model": args.model, "method": "wanda-sp", "sparsity": sparsity, "width_multiple": args.width_multiple,
        "reconstruct": "bias", "data.data_dir": args.data_dir, "eval.max_tokens": args.ppl_tokens,
        "execution.dtype": "fp32", "execution.device": "cpu"})
    prune(settings, out, overwrite=True, progress=False)
    return out / "model"


def make_files(name: str, source, work: Path, types) -> dict[str, Path]:
    """{type: GGUF path} by `pgprune export` (f32 / f16 / q8_0 by pgprune's writer, q4_0 and the other
    llama.cpp types by llama.cpp's quantizer from an f32 file)."""
    from pgprune.gguf_export import export_gguf

    files = {}
    for t in ["f32"] + [t for t in types if t != "f32"]:
        path = work / f"{name}.{t}.gguf"
        if not path.is_file():
            export_gguf(source, path, outtype=t, overwrite=True)
        files[t] = path
    return {t: files[t] for t in types}


def gguf_costs(path: Path, prompt: int, gen: int) -> dict:
    """FLOPs of one prompt's prefill and bytes read per generated token (module text)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = "deci"

    def field(name):
        f = r.fields[f"{arch}.{name}"]
        v = f.contents()
        return v if isinstance(v, list) else [v]

    heads, kv = field("attention.head_count"), field("attention.head_count_kv")
    hd = int(field("attention.key_length")[0])
    names = {t.name: t for t in r.tensors}
    linear = sum(int(t.n_elements) for t in r.tensors if t.name.split(".")[-2] in MATMULS)
    linear_bytes = sum(int(t.n_bytes) for t in r.tensors if t.name.split(".")[-2] in MATMULS)
    head = names.get("output.weight") or names["token_embd.weight"]  # tied: the embedding is the LM head
    att_per_ctx = sum(4 * int(h) * hd for h in heads)  # scores + weighted sum, per position of context
    flops_prefill = 2 * linear * prompt + att_per_ctx * sum(range(1, prompt + 1)) + 2 * int(head.n_elements)
    mean_ctx = prompt + (gen + 1) / 2
    kv_bytes = sum(2 * int(k) * hd * 2 for k in kv) * mean_ctx  # K and V, f16
    return {"linear_params": linear, "flops_prefill": flops_prefill,
            "bytes_per_token": linear_bytes + int(head.n_bytes) + kv_bytes,
            "file_bytes": path.stat().st_size, "n_head": [int(h) for h in heads]}


def open_llm(path: Path, n_ctx: int, threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=False, n_gpu_layers=0, verbose=False)


def time_once(llm, prompt_ids: list[int], gen_ids: list[int]) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s), wall clock around llama.cpp's decode calls (CPU: synchronous;
    the Python around each call is the same for every model)."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    for t in gen_ids:
        llm.eval([t])
    t2 = time.perf_counter()
    return len(prompt_ids) / (t1 - t0), len(gen_ids) / (t2 - t1)


def torch_rows(sources: dict, files: dict, args) -> list[dict]:
    """The same models in pgprune's PyTorch forward (pgprune.evaluate.speed.compare_speed: batch 1, a
    --prompt token prefill, --gen cached decode steps, interleaved, --rounds repeats, --threads threads);
    ideal speed-ups from the f32 GGUF of each model (FLOPs; bytes at f32)."""
    import torch

    from pgprune.evaluate.speed import compare_speed
    from pgprune.models.load import load_model

    torch.set_num_threads(args.threads)
    models = {name: load_model(str(src), dtype=args.torch_dtype, device="cpu")[0] for name, src in sources.items()}
    cmp = compare_speed(models, baseline="dense", prompt_len=args.prompt, new_tokens=args.gen, repeats=args.rounds)
    dense_cost = gguf_costs(files["dense"]["f32"], args.prompt, args.gen)
    rows = []
    for name in sources:
        res, rat = cmp.results[name], cmp.ratios[name]
        row = {"model": name, "type": f"torch-{args.torch_dtype}", "pp_tok_s": res.prefill_tokens_per_s,
               "tg_tok_s": res.decode_tokens_per_s, "param_MiB": res.param_bytes / 2**20}
        if name != "dense":
            cost = gguf_costs(files[name]["f32"], args.prompt, args.gen)
            row.update(pp_speedup=rat["prefill_speedup"], tg_speedup=rat["decode_speedup"],
                       pp_ideal=dense_cost["flops_prefill"] / cost["flops_prefill"],
                       tg_ideal=dense_cost["bytes_per_token"] / cost["bytes_per_token"])
            row["pp_efficiency"] = row["pp_speedup"] / row["pp_ideal"]
            row["tg_efficiency"] = row["tg_speedup"] / row["tg_ideal"]
        rows.append(row)
        print(f"torch {name}: prefill {row['pp_tok_s']:.1f} tok/s, decode {row['tg_tok_s']:.1f} tok/s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--width-multiple", type=int, default=32)
    p.add_argument("--types", default="f16,q8_0,q4_0", help="types timed (f32 is always written for the drift)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--torch-dtype", default="fp32",
                   help="also time the same models in pgprune's PyTorch forward (transformers) at this dtype, "
                        "same threads, prompt and steps, for the speed-ups side by side; 'none' skips it")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--ppl-seqlen", type=int, default=128)
    p.add_argument("--ppl-models", default="dense,0.3", help="models whose perplexity drift is measured")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default=str(REPO / ".cache" / "llamacpp_speed"))
    p.add_argument("--out", default=str(RESULTS_DIR / "llamacpp_speed.json"))
    p.add_argument("--load-only", action="store_true", help="only prune and export the files into --work")
    args = p.parse_args(argv)

    from pgprune.data import get_eval_tokens
    from pgprune.evaluate.llamacpp import perplexity_llamacpp, require_llama_cpp
    from pgprune.models.load import load_model

    require_llama_cpp()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    _, tok = load_model(args.model, dtype="fp32", device="cpu")
    tokens = get_eval_tokens(tok, "wikitext2", "test", data_dir=args.data_dir)

    sources = {"dense": args.model, **{f"{s:g}": prune_model(s, work, args) for s in sparsities}}
    all_types = list(dict.fromkeys(["f32"] + types))
    files = {name: make_files(f"{'dense' if name == 'dense' else 'wanda-sp_' + name + f'_w{args.width_multiple}'}",
                              src, work, all_types) for name, src in sources.items()}
    if args.load_only:
        return 0
    record = {"command": command_line("llamacpp_speed.py", sys.argv[1:] if argv is None else argv),
              "machine": machine(), "threads": args.threads, "prompt_tokens": args.prompt, "gen_tokens": args.gen,
              "rounds": args.rounds, "width_multiple": args.width_multiple, "method": "wanda-sp, --reconstruct bias",
              "models": {n: str(s) for n, s in sources.items()}}
    import llama_cpp

    record["llama_cpp_python"] = llama_cpp.__version__

    # --- perplexity drift ----------------------------------------------------------------------------------
    drift = []
    for name in [] if args.skip_ppl else [n.strip() for n in args.ppl_models.split(",") if n.strip()]:
        base = None
        for t in all_types:
            res = perplexity_llamacpp(files[name][t], tokens, seqlen=args.ppl_seqlen, max_tokens=args.ppl_tokens,
                                      dataset="wikitext2", split="test", threads=args.threads)
            base = res.ppl if t == "f32" else base
            drift.append({"model": name, "type": t, "ppl": res.ppl, "vs_f32": res.ppl / base - 1.0,
                          "file_MiB": files[name][t].stat().st_size / 2**20})
            print(f"ppl {name} {t}: {res.ppl:.3f} ({drift[-1]['vs_f32']:+.2%} vs f32)", flush=True)
    if not args.skip_ppl:
        record["perplexity"] = {"dataset": "wikitext2", "split": "test", "max_tokens": args.ppl_tokens,
                                "seqlen": args.ppl_seqlen, "rows": drift}
        atomic.write_json(args.out, record)
    if args.skip_speed:
        print(table(drift, ["model", "type", "ppl", "vs_f32", "file_MiB"]))
        return 0

    # --- speed ---------------------------------------------------------------------------------------------------
    ids = tokens[0].tolist()
    prompt_ids, gen_ids = ids[: args.prompt], ids[args.prompt: args.prompt + args.gen]
    n_ctx = args.prompt + args.gen
    cells = [(name, t) for t in types for name in sources]
    llms = {c: open_llm(files[c[0]][c[1]], n_ctx, args.threads) for c in cells}
    for c in cells:  # warm-up
        time_once(llms[c], prompt_ids, gen_ids[:4])
    samples = {c: [] for c in cells}
    for r in range(args.rounds):
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for c in order:
            samples[c].append(time_once(llms[c], prompt_ids, gen_ids))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for llm in llms.values():
        llm.close()
    rows = []
    if args.torch_dtype != "none":
        rows += torch_rows(sources, files, args)
    for name, t in cells:
        cost, dense_cost = gguf_costs(files[name][t], args.prompt, args.gen), gguf_costs(files["dense"][t], args.prompt, args.gen)
        pp = [s[0] for s in samples[(name, t)]]
        tg = [s[1] for s in samples[(name, t)]]
        row = {"model": name, "type": t, "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
               "file_MiB": cost["file_bytes"] / 2**20, "pp_samples": pp, "tg_samples": tg}
        if name != "dense":
            dpp = [s[0] for s in samples[("dense", t)]]
            dtg = [s[1] for s in samples[("dense", t)]]
            row["pp_speedup"] = statistics.median(a / b for a, b in zip(pp, dpp))
            row["tg_speedup"] = statistics.median(a / b for a, b in zip(tg, dtg))
            row["pp_ideal"] = dense_cost["flops_prefill"] / cost["flops_prefill"]
            row["tg_ideal"] = dense_cost["bytes_per_token"] / cost["bytes_per_token"]
            row["pp_efficiency"] = row["pp_speedup"] / row["pp_ideal"]
            row["tg_efficiency"] = row["tg_speedup"] / row["tg_ideal"]
        rows.append(row)
    record["speed"] = rows
    atomic.write_json(args.out, record)
    print(table(drift, ["model", "type", "ppl", "vs_f32", "file_MiB"]))
    print()
    print(table(rows, ["model", "type", "file_MiB", "pp_tok_s", "pp_speedup", "pp_ideal", "pp_efficiency",
                       "tg_tok_s", "tg_speedup", "tg_ideal", "tg_efficiency"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
