"""The `pgprune` command: a thin layer that parses options and calls the Python API.

Each subcommand is a pair `_add_<name>(subparsers)` / `_run_<name>(args)` listed in COMMANDS.
Heavy imports happen inside the `_run_*` functions so that `pgprune --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from pgprune.errors import PgpruneError


def _add_common_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weight dtype (auto: bf16 where the device supports it, else fp32)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... or 'auto' for accelerate's device_map over all GPUs "
                        "(default: cuda if available, else cpu)")


def _add_common_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="local data directory with the canonical layouts (env PGPRUNE_DATA_DIR); "
                        "used instead of the Hugging Face hub")


# --- eval -------------------------------------------------------------------------------------
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity (and more)",
                       description="Evaluate a model's perplexity on one or more datasets. MODEL is a "
                                   "hub id, a local Hugging Face folder (dense or pruned), a .gguf file, "
                                   "or the alias smollm2-135m (offline default).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--ppl", default="wikitext2",
                   help="comma-separated datasets for perplexity (default: wikitext2); known: "
                        "wikitext2, c4, ptb, wiki-sample, text:PATH")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--seqlen", type=int, default=128, help="window length in tokens (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate only the first N tokens of each dataset (quick checks)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks through lm-evaluation-harness, or 'all': boolq, "
                        "piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, lambada_openai "
                        "(with --data-dir they read local files; tasks without local data are skipped "
                        "and listed). Use --ppl none for zero-shot only")
    p.add_argument("--limit", type=int, default=None,
                   help="zero-shot: evaluate only the first N examples of each task (quick runs)")
    p.add_argument("--speed", action="store_true",
                   help="also measure prefill / decode speed and memory (batch 1, 128-token prompt, "
                        "32 decode steps; see `pgprune bench` for options)")
    _add_common_model_options(p)
    _add_common_data_options(p)


def _run_eval(args) -> int:
    from pgprune.evaluate.perplexity import evaluate_perplexity, format_ppl_table
    from pgprune.models.load import load_model
    from pgprune import atomic
    from pgprune.evaluate.record import evaluation_record

    if args.tasks is not None:  # check the options before loading the model
        from pgprune.evaluate.zeroshot import _check_limit, parse_tasks

        parse_tasks(args.tasks)
        _check_limit(args.limit)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    results = []
    ppl_names = [] if args.ppl.strip().lower() == "none" else [n.strip() for n in args.ppl.split(",") if n.strip()]
    for name in ppl_names:
        res = evaluate_perplexity(model, tokenizer, name, split=args.split, seqlen=args.seqlen,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens,
                                  data_dir=args.data_dir, progress=True)
        results.append(res)
    if results:
        print(format_ppl_table(args.model, results))
    zeroshot = speed = None
    if args.tasks is not None:
        from pgprune.evaluate.zeroshot import evaluate_zeroshot, format_zeroshot_table

        zeroshot = evaluate_zeroshot(model, tokenizer, args.tasks, data_dir=args.data_dir, limit=args.limit,
                                     batch_size=args.batch_size).to_dict()
        print(format_zeroshot_table(zeroshot))
    if args.speed:
        from pgprune.evaluate.speed import compare_speed, format_speed_table

        speed = compare_speed({args.model: model}, progress=True).to_dict()
        print(format_speed_table(speed))
    if args.json_out:
        atomic.write_json(args.json_out, evaluation_record(
            args.model, perplexity=[r.to_dict() for r in results] if ppl_names else None,
            zeroshot=zeroshot, speed=speed))
        print(f"wrote {args.json_out}")
    return 0


# --- bench ------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure inference speed and memory (optionally against a dense model)",
                       description="Time prefill and cached greedy decoding of MODEL_OR_DIR (a pruned folder, "
                                   "hub id, .gguf or smollm2-135m). With --vs DENSE both models run "
                                   "interleaved in one process and the speed-ups are medians of paired "
                                   "per-repeat ratios.")
    p.add_argument("model", metavar="MODEL_OR_DIR")
    p.add_argument("--vs", default=None, metavar="DENSE", help="baseline model to compare against")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward (default: 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the prefill (default: 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps with the KV cache (default: 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model (default: 5)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    _add_common_model_options(p)


def _run_bench(args) -> int:
    from pgprune import atomic
    from pgprune.evaluate.record import evaluation_record
    from pgprune.evaluate.speed import compare_speed, format_speed_table
    from pgprune.models.load import load_model

    models = {}
    if args.vs:
        models[args.vs] = load_model(args.vs, dtype=args.dtype, device=args.device)[0]
    name = args.model if args.model != args.vs else f"{args.model} (2)"
    models[name] = load_model(args.model, dtype=args.dtype, device=args.device)[0]
    cmp = compare_speed(models, baseline=args.vs or name, batch_size=args.batch_size,
                        prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup,
                        repeats=args.repeats, progress=True).to_dict()
    print(format_speed_table(cmp))
    if args.json_out:
        atomic.write_json(args.json_out, evaluation_record(name, speed=cmp, baseline=args.vs))
        print(f"wrote {args.json_out}")
    return 0


# --- apply / info ------------------------------------------------------------------------------
def _add_apply(sub) -> None:
    p = sub.add_parser("apply", help="apply a mask file to a model and export the pruned model",
                       description="Physically remove the units that a mask file drops and write a Hugging "
                                   "Face folder that reloads with AutoModelForCausalLM.from_pretrained(DIR, "
                                   "trust_remote_code=True) or `pgprune eval DIR`.")
    p.add_argument("model", metavar="MODEL", help="hub id, local folder, .gguf file, or smollm2-135m")
    p.add_argument("--masks", required=True, help="masks.safetensors (as written by `pgprune prune`)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--output-bias", default=None,
                   help="optional safetensors with 'attn' and/or 'mlp' tensors [layers, hidden]: FLAP-style "
                        "bias compensation added to o_proj / down_proj")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weight dtype of the exported model (auto: bf16 where the device supports it, else fp32)")
    p.add_argument("--device", default="cpu", help="where to do the surgery (default: cpu)")


def _run_apply(args) -> int:
    from safetensors.torch import load_file

    from pgprune.export import format_summary, save_pruned, structure_summary
    from pgprune.masks import Masks
    from pgprune.models.load import load_model
    from pgprune.surgery import prune_model

    masks = Masks.load(args.masks)
    bias = load_file(args.output_bias) if args.output_bias else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    prune_model(model, masks, output_bias=bias)
    out = save_pruned(model, tokenizer, args.out, masks=masks, overwrite=args.overwrite,
                      extra={"source_model": args.model, "masks_file": str(args.masks),
                             "output_bias_file": args.output_bias})
    print(format_summary(structure_summary(model), str(out)))
    print(f"wrote {out}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="per-layer widths, parameter counts and sparsity of a model",
                       description="Show each decoder layer's KV heads, query heads, MLP channels and "
                                   "parameters, and the sparsity (fraction of the dense model's decoder-layer "
                                   "parameters removed) of a pruned folder or a dense model.")
    p.add_argument("model", metavar="DIR_OR_MODEL")
    p.add_argument("--json", dest="json_out", default=None, help="write the summary as JSON here")


def _run_info(args) -> int:
    from pgprune import atomic
    from pgprune.export import format_summary, inspect_model

    summary = inspect_model(args.model)
    print(format_summary(summary, args.model))
    if args.json_out:
        atomic.write_json(args.json_out, {"model": args.model, **summary})
        print(f"wrote {args.json_out}")
    return 0


COMMANDS = [
    ("eval", _add_eval, _run_eval),
    ("bench", _add_bench, _run_bench),
    ("apply", _add_apply, _run_apply),
    ("info", _add_info, _run_info),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgprune",
        description="Structural pruning of LLMs with forward passes only: learn which channels, "
                    "heads and layers to remove by policy-gradient optimisation of the pruned "
                    "model's loss, then export a smaller model that reloads with standard Hugging "
                    "Face calls.",
    )
    from pgprune import __version__

    parser.add_argument("--version", action="version", version=f"pgprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, add, _ in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    run = {name: run for name, _, run in COMMANDS}[args.command]
    try:
        return run(args) or 0
    except PgpruneError as e:
        print(f"pgprune {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
