"""n-gram blocking (``no_repeat_ngram_size``): ``fastdecode.processors.block_repeated_ngrams``
against the installed transformers' ``NoRepeatNGramLogitsProcessor`` and against HF's per-row
dictionary construction (``_get_ngrams`` + ``_get_generated_ngrams``, the Python loop earlier
releases ran each step), same run, one step on a full [B, L] history.

    python benchmarks/bench_ngram.py [--batches 5,16,64] [--lengths 512,1024,4096] [--n 3]

Writes benchmarks/results/ngram_<device>.{md,csv,png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers.generation import NoRepeatNGramLogitsProcessor
from transformers.generation import logits_process

from common import Report, time_interleaved
from fastdecode.processors import block_repeated_ngrams

VOCAB = 32000


def hf_loop(history: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """HF's per-row construction of every n-gram's continuation list, then the lookup of the
    current prefix (the pre-vectorised processor)."""
    batch, length = history.shape
    ngrams = logits_process._get_ngrams(n, history, batch)
    for b in range(batch):
        banned = logits_process._get_generated_ngrams(ngrams[b], history[b], n, length)
        scores[b, banned] = float("-inf")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="5,16,64")
    parser.add_argument("--lengths", default="512,1024,4096")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, n = torch.device(args.device), args.n
    hf = NoRepeatNGramLogitsProcessor(n)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for length in map(int, args.lengths.split(",")):
            g = torch.Generator().manual_seed(batch * length)
            # A small alphabet so that the current prefix recurs and tokens get banned.
            history = torch.randint(0, 50, (batch, length), generator=g).to(dev)
            scores = torch.randn(batch, VOCAB, generator=g).to(dev)
            ours = block_repeated_ngrams(scores, history, n)
            assert torch.equal(ours, hf(history, scores.clone()))
            fns = {"ours": lambda: block_repeated_ngrams(scores, history, n),
                   "hf": lambda: hf(history, scores.clone())}
            if length * batch <= 16 * 4096 or dev.type == "cpu":
                fns["hf_loop"] = lambda: hf_loop(history, scores.clone(), n)
            times = {k: v[0] for k, v in time_interleaved(fns, device=args.device,
                                                          repeat=args.repeat).items()}
            row = dict(batch=batch, length=length, ours_ms=times["ours"], hf_ms=times["hf"],
                       hf_loop_ms=times.get("hf_loop", float("nan")),
                       hf_over_ours=times["hf"] / times["ours"],
                       hf_loop_over_ours=times.get("hf_loop", float("nan")) / times["ours"])
            rows.append(row)
            print(row, flush=True)
    report = Report("ngram", device=args.device)
    report.add_table(f"One step of no_repeat_ngram_size={n}, vocab {VOCAB}, ms (median of "
                     "interleaved runs)", rows)
    report.add_note("`ours_ms`: block_repeated_ngrams; `hf_ms`: the installed transformers' "
                    "NoRepeatNGramLogitsProcessor; `hf_loop_ms`: HF's per-row n-gram "
                    "dictionaries (the loop of earlier releases). Ratios are against ours.")
    plot_rows = [dict(length=r["length"], ms=r[k], method=f"{k[:-3]} B={r['batch']}")
                 for r in rows for k in ("ours_ms", "hf_ms", "hf_loop_ms")]
    report.add_plot("n-gram blocking step", plot_rows, x="length", y="ms", series="method",
                    logy=True)
    paths = report.write(*([] if args.out is None else [Path(args.out)]))
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
