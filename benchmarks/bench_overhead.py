"""Per-step host overhead: a model so small that the kernels cost next to nothing, so a decode
step's time is what the host spends around them (Python, argument checks, tensor building).

A 2-layer, 64-wide Llama (random weights, float32) decodes greedily through
``fastdecode.generate``, ``fastdecode.Engine`` and ``model.generate``, alternated in one run.
Each system generates ``--short`` and ``--long`` new tokens from the same prompts; the time of
one decode step is ``(t_long - t_short) / (long - short)``, which cancels the prefill and the
per-call setup. Medians over ``--rounds`` alternated rounds; ratios against ``model.generate``
of the same round.

    python benchmarks/bench_overhead.py [--batches 1 64] [--threads 1] [--rounds 5]

Writes benchmarks/results/overhead_cpu.{md,csv} (helpers from benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import fastdecode
from common import Report

PROMPT = 8


def tiny_model() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, pad_token_id=0,
        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def systems(model, ids: torch.Tensor) -> dict:
    """name -> f(new_tokens): one greedy call producing exactly ``new_tokens`` per row."""
    engine = fastdecode.Engine(model, num_blocks=ids.shape[0] * 64, block_size=16,
                               max_num_seqs=ids.shape[0], enable_prefix_caching=False)
    prompts = ids.tolist()

    def hf(n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n)

    def fd(n):
        return fastdecode.generate(model, ids, attention_mask=torch.ones_like(ids),
                                   do_sample=False, max_new_tokens=n, min_new_tokens=n)

    def eng(n):
        params = fastdecode.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        return engine.generate(prompts, params)

    return {"model.generate": hf, "fastdecode.generate": fd, "Engine": eng}


def step_us(fn, short: int, long: int) -> float:
    times = {}
    for n in (short, long):
        t = time.perf_counter()
        fn(n)
        times[n] = time.perf_counter() - t
    return (times[long] - times[short]) / (long - short) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=72)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_model()
    rows = []
    for batch in args.batches:
        ids = torch.randint(3, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
        fns = systems(model, ids)
        for fn in fns.values():  # warm-up: first calls build caches and load backends
            fn(args.short)
        samples = {name: [] for name in fns}
        ratios = {name: [] for name in fns}
        for r in range(args.rounds):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            got = {name: step_us(fns[name], args.short, args.long) for name in order}
            for name, us in got.items():
                samples[name].append(us)
                ratios[name].append(got["model.generate"] / us)
        for name in fns:
            rows.append({"batch": batch, "system": name,
                         "us_per_step": round(statistics.median(samples[name]), 1),
                         "min_us": round(min(samples[name]), 1),
                         "speedup_vs_hf": round(statistics.median(ratios[name]), 2)})
            print(rows[-1], flush=True)
    report = Report("overhead", device="cpu")
    report.add_note(
        f"2-layer 64-wide Llama, float32, {PROMPT}-token prompts, greedy; one decode step = "
        f"(time for {args.long} new tokens - time for {args.short}) / {args.long - args.short}; "
        f"median of {args.rounds} alternated rounds at {args.threads} thread(s); "
        "speedup_vs_hf: median over rounds of model.generate's step time / this system's.")
    report.add_table("Microseconds per decode step", rows)
    report.write()


if __name__ == "__main__":
    main()
