"""Beam search: fastdecode.generate vs model.generate, same model, same inputs, same run.

Default: the 135M Llama-shaped model (random weights), float32, 5 beams with
``no_repeat_ngram_size=2`` and ``early_stopping=True`` (the translation / summarisation setting),
batch 1 and 4, 64-token prompts, 32 new tokens (``min_new_tokens`` too, so that both decode the
full length). HF and fastdecode runs alternate (paired runs); the median of each is reported,
with the median of the paired ratios. The KV blocks the beams hold at the end are read off the
block manager and compared with five private copies of each prompt's cache.

    python benchmarks/bench_beam.py [--device cuda] [--new-tokens 32] [--repeats 3]

Writes benchmarks/results/beam_<device>.{md,csv,png} (helpers from benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

import fastdecode
from bench_generate import timed
from common import Report
from fastdecode.engine.block_manager import cdiv
from fastdecode.hf import beam_cache
from tiny import default_model

BLOCK = 16  # fastdecode.generate's block size


@contextmanager
def blocks_held(found: list):
    """Records in ``found`` the KV blocks the beams hold after each step of the calls inside."""
    inner = beam_cache.BeamKV.reorder

    def reorder(self, parents):
        inner(self, parents)
        found.append(self.blocks_in_use)

    beam_cache.BeamKV.reorder = reorder
    try:
        yield
    finally:
        beam_cache.BeamKV.reorder = inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="paired runs per batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--backend", default="auto", help="fastdecode ops backend")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = default_model(getattr(torch, args.dtype)).to(device)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len),
                            generator=g).to(device)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      num_beams=args.num_beams, no_repeat_ngram_size=2, early_stopping=True,
                      do_sample=False, attention_mask=torch.ones_like(ids))
        runs = {"hf": lambda: model.generate(ids, **kwargs),
                "fd": lambda: fastdecode.generate(model, ids, backend=args.backend,
                                                  fallback="error", **kwargs)}
        held: list[int] = []
        with blocks_held(held):
            same = torch.equal(runs["hf"](), runs["fd"]())  # also the warm-up
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                times[key].append(timed(fn, device))
        hf_t, fd_t = statistics.median(times["hf"]), statistics.median(times["fd"])
        copies = batch * args.num_beams * cdiv(args.prompt_len + args.new_tokens, BLOCK)
        rows.append(dict(
            batch=batch, num_beams=args.num_beams, new_tokens=args.new_tokens,
            hf_s=round(hf_t, 3), fd_s=round(fd_t, 3), speedup=round(hf_t / fd_t, 2),
            paired_speedup=round(statistics.median(
                h / f for h, f in zip(times["hf"], times["fd"])), 2),
            same_sequences=same, blocks_held=held[-1], blocks_five_copies=copies,
            block_ratio=round(held[-1] / copies, 2)))
    report = Report("beam", device=str(device))
    report.add_note(
        f"fastdecode.generate vs model.generate, beam search ({args.num_beams} beams, "
        f"no_repeat_ngram_size 2, early_stopping True) on the 135M Llama-shaped model (random "
        f"weights), {args.dtype}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens. "
        f"transformers {transformers.__version__}, fastdecode {fastdecode.__version__}. Median of "
        f"{args.repeats} paired runs (the machine is shared; both systems see the same noise).")
    report.add_note(
        f"blocks_held: KV blocks ({BLOCK} tokens) the beams hold after the last step, from the "
        "block manager; blocks_five_copies: what one private cache per beam would take.")
    report.add_table("Beam search", rows)
    blocks = []
    for r in rows:
        blocks.append(dict(batch=r["batch"], blocks=r["blocks_held"], cache="shared beams"))
        blocks.append(dict(batch=r["batch"], blocks=r["blocks_five_copies"], cache="five copies"))
    report.add_plot("KV blocks held", blocks, x="batch", y="blocks", series="cache")
    print("\n".join(f"wrote {path}" for path in report.write(Path(args.out))))


if __name__ == "__main__":
    main()
