"""End-to-end decoding: fastdecode.generate vs model.generate, same model, same inputs, same run.

Default: the 135M Llama-shaped model (random weights), float32, 32-token prompts, 128 new tokens;
batch 1 greedy and batch 8 sampling (temperature 0.8, top_k 50, top_p 0.95, repetition penalty
1.2). HF and fastdecode runs alternate so that machine noise hits both alike; the median is
reported. Fraction of the weights-read bound = (weight bytes / measured read bandwidth) / step time.

    python benchmarks/bench_generate.py [--device cuda] [--new-tokens 128] [--repeats 3]

Writes benchmarks/results/generate_<device>.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import fastdecode
from fastdecode.hf.tiny import default_model

SCENARIOS = {
    "batch1-greedy": dict(batch=1, kwargs=dict(do_sample=False)),
    "batch8-sampling": dict(batch=8, kwargs=dict(do_sample=True, temperature=0.8, top_k=50,
                                                 top_p=0.95, repetition_penalty=1.2)),
}


# ---- local helpers; candidates for benchmarks/common.py (bandwidth, timing, report writing) ----
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Sustained read bandwidth in bytes/s: best of ``repeats`` full reductions of ``mib`` MiB."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    load = ", load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads{load}")


def write_report(rows: list[dict], header: list[str], out: Path, title: str, notes: list[str]):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", *[f"- {n}" for n in notes], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["scenario"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([x - 0.2 for x in xs], [r["hf_tok_s"] for r in rows], 0.4, label="model.generate")
    ax.bar([x + 0.2 for x in xs], [r["fd_tok_s"] for r in rows], 0.4, label="fastdecode")
    for x, r in zip(xs, rows):
        ax.text(x + 0.2, r["fd_tok_s"], f"{r['speedup']}x", ha="center", va="bottom")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


# ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--backend", default="auto", help="fastdecode ops backend")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = default_model(getattr(torch, args.dtype)).to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = read_bandwidth(device)
    bound_step = weight_bytes / bandwidth
    rows = []
    for name in args.scenarios.split(","):
        spec = SCENARIOS[name]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (spec["batch"], args.prompt_len),
                            generator=g).to(device)
        # min_new_tokens: a random model may emit EOS early; both sides decode the full length.
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      attention_mask=torch.ones_like(ids), **spec["kwargs"])
        runs = {"hf": lambda: model.generate(ids, **kwargs),
                "fd": lambda: fastdecode.generate(model, ids, backend=args.backend, **kwargs)}
        for fn in runs.values():  # warm-up (allocator, lazy init)
            fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                times[key].append(timed(fn, device))
        tokens = spec["batch"] * args.new_tokens
        hf_t, fd_t = statistics.median(times["hf"]), statistics.median(times["fd"])
        rows.append(dict(
            scenario=name, batch=spec["batch"], new_tokens=args.new_tokens,
            hf_tok_s=round(tokens / hf_t, 2), fd_tok_s=round(tokens / fd_t, 2),
            speedup=round(hf_t / fd_t, 2), hf_ms_step=round(hf_t / args.new_tokens * 1e3, 1),
            fd_ms_step=round(fd_t / args.new_tokens * 1e3, 1),
            fd_bound_fraction=round(bound_step / (fd_t / args.new_tokens), 2),
            hf_bound_fraction=round(bound_step / (hf_t / args.new_tokens), 2)))
        print(rows[-1], flush=True)
    header = list(rows[0])
    from fastdecode.ops import _backends
    resolved = _backends.resolve(args.backend, "paged_attention", device).__name__.split(".")[-1]
    notes = [f"machine: {machine_line(device)}",
             f"versions: torch {torch.__version__}, transformers {transformers.__version__}, "
             f"fastdecode {fastdecode.__version__} (ops backend {args.backend} -> {resolved})",
             f"model: 135M Llama-shaped (random weights), {args.dtype}, "
             f"{weight_bytes / 2**20:.0f} MiB of weights; prompt {args.prompt_len} tokens",
             f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s -> weights-read bound "
             f"{bound_step * 1e3:.1f} ms per step",
             f"median of {args.repeats} alternating runs; command: `python "
             f"{' '.join(sys.argv)}`"]
    out = Path(args.out) / f"generate_{device.type}"
    write_report(rows, header, out, "fastdecode.generate vs model.generate", notes)
    plot(rows, out, f"135M Llama {args.dtype}, {machine_line(device)}")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
