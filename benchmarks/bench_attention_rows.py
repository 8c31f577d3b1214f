"""CPU paged attention with many query rows per kv head: packed prefill over a cached prefix, the
shared-prefix (cascade) call, and decode, in GFLOP/s.

    PYTHONPATH=. python benchmarks/bench_attention_rows.py --threads 1
    python benchmarks/bench_attention_rows.py --builds before=BASE_TREE,after=. --rounds 5

With many query rows per kv head (a prefill's tokens x the GQA group, or every decode row of a
step against a shared system prompt) the kernel is bound by its arithmetic, not by reading the
KV, so it is reported in GFLOP/s: 4 * head_dim floating-point operations per (query row, visible
key) pair (q . k and p * v), counted from the masks. Decode calls (few rows per kv head) are timed
too: what speeds up many rows must not slow them down.

``--builds`` names source trees with a built extension (each a ``fastdecode`` checkout, e.g. an
earlier commit exported with ``git archive`` and built in place): each round runs every build
in its own process, alternated, and the table gives medians over the rounds and the ratio of
each build to the first (the baseline, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from common import Report, time_ms


@dataclass(frozen=True)
class Shape:
    """One call: num_seqs sequences of kv_len KV positions whose last q_len are query tokens
    (q_len 0: decode form, one query each); causal unless shared (the cascade call: every query
    row of a step, as one packed non-causal sequence over kv_len shared keys, with lse)."""

    name: str
    num_seqs: int
    kv_len: int
    q_len: int
    shared: bool = False


def shapes(prefill_tokens: list[int]) -> list[Shape]:
    rows = [Shape(f"prefill {t} tokens (64 per seq over 512 cached)", t // 64, 576, 64)
            for t in prefill_tokens]
    rows.append(Shape("cascade: 32 decode tokens x 512 shared keys", 1, 512, 32, shared=True))
    rows += [Shape(f"decode batch {b} x 576 KV", b, 576, 0) for b in (1, 32)]
    return rows


class Call:
    """The tensors of one Shape for the cpu kernel: Hq / Hkv heads of head_dim, fp32 caches in
    block_size blocks handed out in shuffled order."""

    def __init__(self, s: Shape, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int):
        import fastdecode.ops as ops
        import fastdecode.ops._extension  # noqa: F401  (registers torch.ops.fastdecode.*)
        self.s, self.hq, self.d = s, num_qo_heads, head_dim
        per_seq = -(-s.kv_len // block_size)
        shape = (s.num_seqs * per_seq, block_size, num_kv_heads, head_dim)
        self.k_cache, self.v_cache = ops.allocate_kv_cache(*shape, dtype=torch.float32)
        self.k_cache.copy_(torch.randn(shape))
        self.v_cache.copy_(torch.randn(shape))
        self.tables = torch.randperm(shape[0]).view(s.num_seqs, per_seq).int()
        self.lens = torch.full((s.num_seqs,), s.kv_len, dtype=torch.int32)
        tokens = s.num_seqs * max(s.q_len, 1)
        self.query = torch.randn(tokens, num_qo_heads, head_dim)
        self.out = torch.empty_like(self.query)
        self.lse = torch.empty(tokens, num_qo_heads)
        self.cu = (torch.arange(s.num_seqs + 1, dtype=torch.int32) * s.q_len
                   if s.q_len else None)
        self.scale = head_dim ** -0.5

    def fn(self) -> Callable[[], None]:
        op = torch.ops.fastdecode.paged_attention_lse
        args = (self.out, self.lse, self.query, self.k_cache, self.v_cache, self.tables,
                self.lens, self.cu, self.scale, not self.s.shared, 0.0)
        return lambda: op(*args)

    def flops(self) -> float:
        s = self.s
        if s.shared or not s.q_len:
            pairs = s.num_seqs * max(s.q_len, 1) * s.kv_len
        else:  # token t of q_len sees kv_len - q_len + t + 1 keys
            pairs = s.num_seqs * sum(s.kv_len - s.q_len + t + 1 for t in range(s.q_len))
        return 4.0 * self.d * self.hq * pairs


PREFILL_STEP = "engine: first step of the shared-prefix serving workload (s)"


def prefill_step_seconds(repeat: int) -> float:
    """Median wall time of an Engine's first step on bench_serving.py's shared-prefix workload
    (135M Llama-shaped random model, 32 prompts of a 512-token system prompt + 16-64 own tokens,
    its default engine settings): the packed prefill of the burst."""
    from argparse import Namespace

    from bench_serving import build_model, workload
    from fastdecode import Engine, SamplingParams
    model = build_model()
    prompts = workload(Namespace(workload="shared-prefix", system_len=512, num_requests=32,
                                 seed=0), model.config.vocab_size)
    times = []
    for _ in range(repeat):
        engine = Engine(model, block_size=16, num_blocks=2048, max_batch_tokens=2048,
                        max_num_seqs=256, enable_prefix_caching=True)
        for p in prompts:
            engine.add_request(p, SamplingParams(max_new_tokens=1, temperature=0.0))
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args) -> dict[str, float]:
    """GFLOP/s of every shape (and the engine step's seconds) with the fastdecode found on
    sys.path."""
    torch.set_num_threads(args.threads)
    res = {PREFILL_STEP: prefill_step_seconds(args.step_repeat)} if args.prefill_step else {}
    for s in shapes(args.prefill_tokens):
        call = Call(s, args.num_qo_heads, args.num_kv_heads, args.head_dim, args.block_size)
        ms = time_ms(call.fn(), repeat=args.repeat, min_time_s=args.min_time)
        res[s.name] = call.flops() / (ms * 1e-3) / 1e9
    return res


def run_build(tree: str, argv: list[str]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    proc = subprocess.run([sys.executable, __file__, "--worker", *argv], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: Optional[list[str]] = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builds", help="comma-separated [label=]source trees, each with a built "
                    "extension; the first is the baseline (default: the fastdecode on the path)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds over the builds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill-tokens", type=lambda v: [int(x) for x in v.split(",")],
                    default=[512, 1024, 2048], help="query tokens of the packed prefill calls")
    ap.add_argument("--num-qo-heads", type=int, default=9)
    ap.add_argument("--num-kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds timed per shape")
    ap.add_argument("--prefill-step", action="store_true",
                    help="also time an Engine's first step on the shared-prefix workload")
    ap.add_argument("--step-repeat", type=int, default=3, help="engine steps per round")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def parse_builds(spec: Optional[str]) -> dict[str, Optional[str]]:
    """``label=tree,...`` (a bare tree is its own label) -> {label: tree}; None: this process's
    fastdecode only."""
    if not spec:
        return {"this tree": None}
    return dict((part.split("=", 1) if "=" in part else (part, part))
                for part in spec.split(","))


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    passthrough = [a for a in sys.argv[1:] if a != "--no-write"]
    builds = parse_builds(args.builds)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in builds}
    for _ in range(args.rounds):
        for label, tree in builds.items():
            runs[label].append(run_build(tree, passthrough) if tree else worker(args))
    base, *others = builds
    rows = []
    names = [s.name for s in shapes(args.prefill_tokens)]
    for name in names + ([PREFILL_STEP] if args.prefill_step else []):
        row = {"call": name}
        for label in builds:
            row[label] = statistics.median(r[name] for r in runs[label])
        for label in others:  # speedup: the GFLOP/s ratio, or the inverse ratio of seconds
            ratio = row[label] / row[base]
            row[f"{label} / {base}"] = ratio if name in names else 1 / ratio
        rows.append(row)
    report = Report("attention_rows", "cpu")
    report.add_note(f"Hq {args.num_qo_heads}, Hkv {args.num_kv_heads}, head_dim {args.head_dim}, "
                    f"block {args.block_size}, fp32, {args.threads} thread(s); medians of "
                    f"{args.rounds} alternated rounds. Builds: "
                    + ", ".join(f"{label} (`{tree or 'this process'}`)"
                                for label, tree in builds.items()) + ".")
    report.add_note(__doc__.split("\n\n", 2)[2])
    report.add_table("GFLOP/s per call (engine step: seconds)", rows, csv_name="rows")
    if not args.no_write:
        for path in report.write():
            print("wrote", path)


if __name__ == "__main__":
    main()
