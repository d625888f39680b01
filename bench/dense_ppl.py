"""Dense SmolLM2-135M perplexity: WikiText-2 test at seqlen 128 and 2048, and the Wikipedia sample.

    python bench/dense_ppl.py --data-dir ../shared/data [--dtype fp32] [--max-tokens N]

Prints a table and writes bench/results/dense_ppl.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

from pgprune.evaluate.perplexity import evaluate_perplexity  # noqa: E402
from pgprune.models.load import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--cases", default="wikitext2:128,wikitext2:2048,wiki-sample:128,wiki-sample:2048")
    args = ap.parse_args()

    model, tok = load_model(args.model, dtype=args.dtype, device="cpu")
    rows = []
    for case in args.cases.split(","):
        source, seqlen = case.split(":")
        seqlen = int(seqlen)
        r = evaluate_perplexity(model, tok, source, "test", seqlen=seqlen, batch_size=max(1, 1024 // seqlen),
                                max_tokens=args.max_tokens, data_dir=args.data_dir, progress=True)
        rows.append(r.to_dict())
        print(f"{source} seqlen {seqlen}: ppl {r.ppl:.3f} ({r.tokens} tokens, {r.tokens_per_s:.0f} tok/s)", flush=True)
    print(table(rows, ["dataset", "split", "seqlen", "windows", "tokens", "ppl", "tokens_per_s", "seconds", "dtype", "limited"]))
    save("dense_ppl", {"model": args.model, "command": " ".join(sys.argv), "results": rows})


if __name__ == "__main__":
    main()
