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
    p.add_argument("--engine", default="torch", choices=["torch", "llama.cpp"],
                   help="torch (default): pgprune's PyTorch forward; llama.cpp: score a .gguf file with "
                        "llama.cpp's own forward (needs pgprune[llamacpp]; perplexity only), same windows")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="--engine llama.cpp: tokenize with this model's Hugging Face tokenizer (folder, hub id "
                        "or smollm2-135m), giving exactly the tokens of `pgprune eval MODEL` (default: the "
                        "tokenizer inside the GGUF)")
    p.add_argument("--threads", type=int, default=None,
                   help="--engine llama.cpp: CPU threads (default: all cores)")
    _add_common_model_options(p)
    _add_common_data_options(p)


def _run_eval(args) -> int:
    from pgprune.evaluate.perplexity import evaluate_perplexity, format_ppl_table
    from pgprune.models.load import load_model
    from pgprune import atomic
    from pgprune.evaluate.record import evaluation_record

    if args.engine == "llama.cpp":
        return _run_eval_llamacpp(args)
    if args.tokenizer is not None or args.threads is not None:
        from pgprune.errors import ConfigError

        raise ConfigError("--tokenizer and --threads belong to --engine llama.cpp")
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


def _run_eval_llamacpp(args) -> int:
    from pathlib import Path

    from pgprune import atomic
    from pgprune.errors import ConfigError, ModelLoadError
    from pgprune.evaluate.llamacpp import evaluate_perplexity_llamacpp, require_llama_cpp
    from pgprune.evaluate.perplexity import format_ppl_table
    from pgprune.evaluate.record import evaluation_record

    if args.tasks is not None or args.speed:
        raise ConfigError("--engine llama.cpp measures perplexity only; drop --tasks / --speed (for llama.cpp "
                          "speed see bench/llamacpp_speed.py)")
    if Path(args.model).suffix != ".gguf" or not Path(args.model).is_file():
        raise ModelLoadError(f"--engine llama.cpp evaluates a .gguf file; {args.model} is not one (write one with "
                             "`pgprune export MODEL --format gguf --out FILE.gguf`)")
    require_llama_cpp()
    tokenizer = None
    if args.tokenizer is not None:
        from pgprune.models.load import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    ppl_names = [] if args.ppl.strip().lower() == "none" else [n.strip() for n in args.ppl.split(",") if n.strip()]
    results, tok_name = [], None
    for name in ppl_names:
        res, tok_name = evaluate_perplexity_llamacpp(args.model, name, split=args.split, seqlen=args.seqlen,
                                                     max_tokens=args.max_tokens, data_dir=args.data_dir,
                                                     tokenizer=tokenizer, threads=args.threads, progress=True)
        results.append(res)
    if results:
        print(format_ppl_table(f"{args.model} (llama.cpp, tokenizer: {args.tokenizer or 'the GGUF'})", results))
    if args.json_out:
        atomic.write_json(args.json_out, evaluation_record(
            args.model, perplexity=[dict(r.to_dict(), engine="llama.cpp", tokenizer=args.tokenizer or tok_name)
                                    for r in results]))
        print(f"wrote {args.json_out}")
    return 0


# --- export -----------------------------------------------------------------------------------
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a pruned (or dense) model as GGUF for llama.cpp / Ollama",
                       description="Write MODEL (a pruned folder, a dense folder, hub id, .gguf file or smollm2-135m) "
                                   "as a GGUF file of llama.cpp's `deci` architecture: per-layer head, KV-head and "
                                   "FFN-width arrays, removed layers dropped, the tokenizer carried over. Written "
                                   "atomically.")
    p.add_argument("model", metavar="PRUNED_FOLDER_OR_MODEL")
    p.add_argument("--format", default="gguf", choices=["gguf"],
                   help="gguf (llama.cpp); the Hugging Face folder is what `prune` / `apply` write")
    from pgprune.gguf_types import OUTTYPES as GGUF_OUTTYPES

    p.add_argument("--outtype", default="f16", choices=GGUF_OUTTYPES, metavar="OUTTYPE",
                   help="weight type of the matrices (default f16): " + ", ".join(GGUF_OUTTYPES) + ". q8_0 is "
                        "written by pgprune, q4_0 and below by llama.cpp's quantizer (needs pgprune[llamacpp]); "
                        "quantized types need row lengths that are multiples of 32 (k-quants: 256). Norms and "
                        "biases stay f32")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--tokenizer-from", default=None, metavar="GGUF_OR_FOLDER",
                   help="take the tokenizer from this .gguf file or Hugging Face folder (default: the GGUF the "
                        "model came from where its provenance says so, else the folder's tokenizer files)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", dest="json_out", default=None, help="write the export summary as JSON here")


def _run_export(args) -> int:
    from pgprune import atomic
    from pgprune.gguf_export import export_gguf, format_gguf_summary

    summary = export_gguf(args.model, args.out, outtype=args.outtype, tokenizer_from=args.tokenizer_from,
                          overwrite=args.overwrite)
    print(format_gguf_summary(summary))
    print(f"wrote {args.out} (run it: llama-cli -m {args.out}, or `pgprune eval {args.out} --engine llama.cpp`)")
    if args.json_out:
        atomic.write_json(args.json_out, {"model": args.model, **summary})
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
    p.add_argument("--width-multiple", type=int, default=1, metavar="N",
                   help="round every kept MLP width to a multiple of N (32 for llama.cpp's q8_0 / q4_0), keeping "
                        "the mask's sparsity as closely as N allows; the mask file carries no scores, so the "
                        "boundary channels are chosen by weight magnitude (prune with --width-multiple to "
                        "choose them by the method's own scores). Default 1: the mask as it is")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weight dtype of the exported model (auto: bf16 where the device supports it, else fp32)")
    p.add_argument("--device", default="cpu", help="where to do the surgery (default: cpu)")


def _run_apply(args) -> int:
    from safetensors.torch import load_file

    from pgprune.export import format_summary, save_pruned, structure_summary
    from pgprune.masks import Masks
    from pgprune.models.load import load_model
    from pgprune.surgery import remove_units

    from pgprune.budget import check_width_multiple

    multiple = check_width_multiple(args.width_multiple)
    masks = Masks.load(args.masks)
    bias = load_file(args.output_bias) if args.output_bias else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    rounding = None
    if multiple > 1:
        masks, rounding = _round_mask_widths(model, masks, multiple, has_bias=bias is not None)
    remove_units(model, masks, output_bias=bias)
    out = save_pruned(model, tokenizer, args.out, masks=masks, overwrite=args.overwrite,
                      extra={"source_model": args.model, "masks_file": str(args.masks),
                             "output_bias_file": args.output_bias, "width_multiple": multiple,
                             "width_rounding": rounding})
    print(format_summary(structure_summary(model), str(out)))
    print(f"wrote {out}")
    return 0


def _round_mask_widths(model, masks, multiple: int, has_bias: bool):
    """`apply --width-multiple`: the mask's MLP widths rounded by weight magnitude (standardised)."""
    from pgprune.budget import check_width_multiple, round_widths
    from pgprune.errors import ConfigError
    from pgprune.masks import UnitCosts
    from pgprune.metrics.scores import scores_from_stats
    from pgprune.models.adapter import get_adapter

    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    check_width_multiple(multiple, costs)
    masks.check(costs)
    if masks.num_masks is not None:
        raise ConfigError("--masks holds a stack of masks; apply takes one mask")
    if "channel" not in masks.kinds:
        return masks, None
    keys = scores_from_stats(adapter, None, "magnitude", ("channel",)).standardized
    rounded, info = round_widths(masks, keys, costs, multiple, float(masks.sparsity(costs)))
    if has_bias and not torch_equal(rounded["channel"], masks["channel"]):
        raise ConfigError(f"--width-multiple {multiple} changes this mask (layers {info.rounded_up + info.rounded_down}), "
                          "but --output-bias was computed for the mask as it is; prune with --width-multiple "
                          "instead, or apply without --output-bias")
    print(f"[pgprune] width multiple {multiple}: MLP widths {info.before} -> {info.after}, "
          f"sparsity {masks.sparsity(costs):.4f} -> {info.sparsity:.4f}")
    return rounded, info.to_dict()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


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


# --- prune ------------------------------------------------------------------------------------
# The options are RunSettings' fields (pgprune.config): each field's metadata carries its flag, help
# and group. Defaults are not set here: an option given on the command line overrides --recipe.
_SHOW_ALL = False  # set by main() when --help-all is asked for
_GROUP_TITLES = {
    "advanced": "advanced (shown by --help-all)",
    "experimental": "experimental: measured not to help on SmolLM2 (bench/RESULTS.md), kept for research",
}


def _add_prune(sub) -> None:
    from pgprune.config import MAIN, RECIPES, RunSettings, flag_of, walk_fields

    p = sub.add_parser(
        "prune", help="prune a model (policy gradient, or a metric method) and export it",
        description="Prune MODEL to the given sparsity (fraction of the decoder layers' parameters removed) "
                    "and write the pruned Hugging Face folder, masks, run.json and metrics.jsonl into --out. "
                    "--method pg learns the masks with forward passes only (policy gradient), starting from "
                    "--init's mask. Settings come from --recipe (default 'features', our best measured; "
                    "'paper': the authors' settings); options given here override it.",
        epilog="recipes: " + "; ".join(f"{n}: {r['doc']}" for n, r in RECIPES.items()))
    defaults = RunSettings()
    groups = {g: p.add_argument_group(t) for g, t in _GROUP_TITLES.items()}
    for path, f in walk_fields(defaults):
        meta = f.metadata
        group = meta["group"]
        target = p if group == MAIN else groups[group]
        default = defaults.get(path)
        shown = "" if path == "recipe" or default in (None, "") else f" (default {default})"
        text = meta["help"] + shown
        if group != MAIN and not _SHOW_ALL:
            text = argparse.SUPPRESS
        kwargs = dict(meta["argparse"])
        if kwargs.pop("action", None) == "boolean":
            kwargs["action"] = argparse.BooleanOptionalAction
        if meta["choices"]:
            kwargs["choices"] = list(meta["choices"])
        if flag_of(path, f) == "model":  # the positional
            target.add_argument("model", metavar="MODEL", nargs="?", default=argparse.SUPPRESS, help=text)
            continue
        kwargs.setdefault("metavar", None if "choices" in kwargs or "action" in kwargs else f.name.upper())
        target.add_argument(flag_of(path, f), dest=path, default=argparse.SUPPRESS, help=text, **kwargs)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the pg run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--report", action="store_true",
                   help="write report.md, report.json and plots into --out at the end (needs matplotlib)")
    p.add_argument("--help-all", action="help", help="show every option, the advanced and experimental ones too")


def settings_from_args(args):
    """RunSettings from parsed `prune` options: the recipe, then every option given explicitly."""
    from pgprune.config import RunSettings, walk_fields

    given = {path: getattr(args, path) for path, _ in walk_fields() if hasattr(args, path)}
    return RunSettings.from_recipe(given.pop("recipe", "features"), given)


def _run_prune(args) -> int:
    from pgprune.pruning import prune

    settings = settings_from_args(args)
    if args.report:  # fail now, not after a long run, when matplotlib is missing
        from pgprune.report import require_matplotlib

        require_matplotlib()
    if settings.execution.tensorboard is not None and settings.method == "pg":  # likewise for tensorboard
        from pgprune.policy.loop import require_tensorboard

        require_tensorboard()
    from pgprune.policy.distributed import init_from_env, shutdown

    world, rank_device = init_from_env()  # under torchrun: process group + this rank's device
    if world.size > 1:
        settings.execution.device = str(rank_device)
    try:
        record = prune(settings, args.out, resume=args.resume, overwrite=args.overwrite, progress=world.is_main,
                       world=world)
    finally:
        shutdown()
    if not world.is_main:
        return 0
    ppl = record["perplexity"]
    m = record["masks"]
    print(f"\npruned {settings.model} with {settings.method}: sparsity {m['sparsity']:.4f} of prunable parameters "
          f"({m['total_sparsity']:.4f} of all), perplexity at seqlen {settings.eval.seqlen}"
          + (f" on the first {settings.eval.max_tokens} tokens" if settings.eval.max_tokens else "") + ":")
    stages = [s for s in ("dense", "init", "gated", "pruned") if s in ppl]
    labels = {"dense": "dense", "init": "start", "gated": "final", "pruned": "exported"}
    print("  " + "dataset".ljust(12) + "".join(labels[s].rjust(12) for s in stages))
    for name in ppl["dense"]:
        print("  " + name.ljust(12) + "".join(f"{ppl[s][name]:12.3f}" for s in stages))
    print(f"wrote {record['pruned_model']} (reload: pgprune.load_pruned or AutoModelForCausalLM.from_pretrained("
          "..., trust_remote_code=True))")
    if args.report:
        from pgprune.report import write_report
        from pgprune.run_folder import REPORT_MD

        write_report(args.out)
        print(f"wrote {args.out}/{REPORT_MD}")
    return 0


# --- report -----------------------------------------------------------------------------------
def _add_report(sub) -> None:
    p = sub.add_parser("report", help="summarise a run folder: report.md, report.json and plots",
                       description="Read a run folder written by `pgprune prune --out RUN_DIR` and write into it "
                                   "report.md (model, method, sparsity, perplexity table, PG settings, plots), "
                                   "report.json (the same numbers) and PNG plots: kept heads / channels per "
                                   "layer, and for policy-gradient runs the keep-probability histograms and "
                                   "the loss / hard-mask perplexity curves. Needs matplotlib (pgprune[plot]).")
    p.add_argument("run_dir", metavar="RUN_DIR")


def _run_report(args) -> int:
    from pgprune.report import write_report
    from pgprune.run_folder import REPORT_JSON, REPORT_MD

    s = write_report(args.run_dir)
    sp = s["sparsity"]
    print(f"{s['model']['name']} pruned with {s['method']}: sparsity {sp['prunable']:.2%} of prunable parameters "
          f"({sp['total']:.2%} of all)")
    for name, why in s["skipped_plots"].items():
        print(f"no {name} plot: {why}")
    files = [REPORT_MD, REPORT_JSON] + [p["file"] for p in s["plots"].values()]
    print(f"wrote {', '.join(files)} in {args.run_dir}")
    return 0


COMMANDS = [
    ("prune", _add_prune, _run_prune),
    ("eval", _add_eval, _run_eval),
    ("bench", _add_bench, _run_bench),
    ("apply", _add_apply, _run_apply),
    ("export", _add_export, _run_export),
    ("info", _add_info, _run_info),
    ("report", _add_report, _run_report),
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
    global _SHOW_ALL
    argv = sys.argv[1:] if argv is None else argv
    _SHOW_ALL = "--help-all" in argv
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
