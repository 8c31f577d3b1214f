"""Benchmark fastdecode.ops.sample against transformers' processor chain.

Per call: repetition penalty over L seen tokens -> temperature -> top-k -> top-p -> one draw per
row, logits [B, V] float32. Baselines measured in the same run (these machines are noisy):
transformers' LogitsProcessorList + softmax + torch.multinomial, the same chain in plain torch
with sort-based top-k / top-p (fastdecode's ``torch`` backend), and the time to read the logits
once (a max-reduction over them: the bandwidth bound no sampler can beat).

    python benchmarks/bench_sampling.py --device cpu
    python benchmarks/bench_sampling.py --device cuda --backends cuda,triton

Writes benchmarks/results/sampling_<device>.{md,csv,png} with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fastdecode.ops as ops  # noqa: E402

DEFAULTS = {
    "cpu": dict(batch=64, vocab=128256, seen=512, temperature=0.8, top_k=50, top_p=0.95,
                penalty=1.2, sweep=[1, 8, 32, 64, 128], backends="cpu"),
    "cuda": dict(batch=128, vocab=128256, seen=1024, temperature=0.7, top_k=50, top_p=0.9,
                 penalty=1.1, sweep=[1, 8, 32, 128, 256], backends="cuda,triton"),
}


# ----------------------------------------------------------------- timing and reporting helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int, warmup: int) -> tuple[float, float]:
    """(median, best) wall time of fn() in milliseconds, device synchronised around each call.
    The best is reported too because on a shared machine a parallel call often waits for a
    descheduled worker thread, which inflates the median of every parallel method alike."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def machine_info(device: torch.device) -> dict[str, str]:
    import transformers

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": f"{cpu}, torch threads {torch.get_num_threads()}",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                        f"transformers {transformers.__version__}, fastdecode {commit}",
            "command": "python " + " ".join(sys.argv)}
    if hasattr(os, "getloadavg"):  # a shared machine inflates every time, ratios less so
        loads = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        info["load average at start (1, 5, 15 min)"] = loads
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(stem: Path, info: dict, header: list[str], rows: list[list],
                  sweep_header: list[str], sweep_rows: list[list]) -> None:
    """Markdown (machine, command, both tables), CSV (main table) and a PNG of the sweep."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    def table(h, rs):
        lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        return lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rs]
    md = [f"# {stem.name}", ""] + [f"- {k}: `{v}`" for k, v in info.items()] + [""]
    md += table(header, rows) + ["", "Batch sweep (best ms per call):", ""]
    md += table(sweep_header, sweep_rows)
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = [r[0] for r in sweep_rows]
    for j, name in enumerate(sweep_header[1:], start=1):
        ax.plot(batches, [r[j] for r in sweep_rows], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch size (rows)", ylabel="best ms per call",
           title=stem.name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


# ------------------------------------------------------------------------------------ methods
def make_methods(args, backends: list[str]):
    """name -> fn(logits, seen) for every method timed."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(args.penalty),
                                 TemperatureLogitsWarper(args.temperature),
                                 TopKLogitsWarper(args.top_k), TopPLogitsWarper(args.top_p)])

    def transformers_chain(logits, seen):
        scores = chain(seen, logits)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]

    params = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.penalty)

    def fastdecode_backend(name):
        return lambda logits, seen: ops.sample(logits, seen_tokens=seen, backend=name, **params)

    methods = {"transformers": transformers_chain, "torch (sort)": fastdecode_backend("torch")}
    methods.update({f"fastdecode {b}": fastdecode_backend(b) for b in backends})
    methods["read logits once"] = lambda logits, seen: logits.amax()
    return methods


def inputs(args, batch: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, args.vocab, generator=gen) * 2.0).to(device)
    seen = torch.randint(0, args.vocab, (batch, args.seen), generator=gen).to(device)
    return logits, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backends", help="fastdecode backends, comma separated "
                        "(default: cpu on --device cpu, cuda,triton on cuda)")
    for name in ("batch", "vocab", "seen", "top_k"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    for name in ("temperature", "top_p", "penalty"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float)
    parser.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")],
                        help="batch sizes for the sweep plot, comma separated")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    info = machine_info(device)
    backends = [b for b in args.backends.split(",") if b]
    methods = make_methods(args, backends)
    base, read = "transformers", "read logits once"

    logits, seen = inputs(args, args.batch, device)
    times = {name: time_ms(lambda: fn(logits, seen), device, args.iters, args.warmup)
             for name, fn in methods.items()}
    header = ["method", "median ms", "best ms", "speedup vs transformers (median)",
              "speedup (best)", "read bound / time (median)", "read bound / time (best)"]
    rows = [[name, f"{med:.3f}", f"{best:.3f}", f"{times[base][0] / med:.1f}x",
             f"{times[base][1] / best:.1f}x", f"{times[read][0] / med:.1%}",
             f"{times[read][1] / best:.1%}"] for name, (med, best) in times.items()]

    sweep_rows = []
    for batch in args.sweep:
        logits, seen = inputs(args, batch, device)
        iters = max(3, args.iters // 2)
        best = [time_ms(lambda: fn(logits, seen), device, iters, 1)[1] for fn in methods.values()]
        sweep_rows.append([batch] + [round(t, 3) for t in best])

    info["shape"] = (f"batch {args.batch}, vocab {args.vocab}, float32 logits; penalty "
                     f"{args.penalty} over {args.seen} seen tokens, temperature "
                     f"{args.temperature}, top_k {args.top_k}, top_p {args.top_p}")
    write_results(args.out / f"sampling_{args.device}", info, header, rows,
                  ["batch"] + list(methods), sweep_rows)
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
