"""Paged decode attention: fastdecode backends against torch SDPA, as a fraction of memory
bandwidth.

    PYTHONPATH=. python benchmarks/bench_attention.py --device cpu
    PYTHONPATH=. python benchmarks/bench_attention.py --device cuda --backends triton,cuda

Decode attention is memory bound: each step reads every sequence's K and V once. Reported per
method: median ms, achieved GB/s (K + V bytes a decode step must read / time) and that as a
fraction of the read bandwidth measured in the same round-robin as the methods (the ``read
bandwidth probe`` row: the sum of a 512 MiB float32 tensor), so that drift on a shared machine
hits both sides of the ratio alike.

All large tensors (paged pools, contiguous baselines, the probe) are allocated the way
``fastdecode.ops.allocate_kv_cache`` allocates KV pools: in huge pages where the machine allows.
On CPU two more rows time the kernel on a plain torch allocation (4 KiB pages unless the
machine puts every allocation in huge pages), to show what the pool allocation is worth, and on
block tables handed out in pool order (each sequence's KV one contiguous run), to show what the
scattered blocks cost.

Baselines, measured in the same run on the same keys and values:
- ``sdpa contiguous``: torch SDPA with the KV stored contiguously ([B, Hkv, L, D], no paging),
  the layout a paged kernel gives up. Two GQA formulations are timed and the faster is the
  baseline: ``enable_gqa=True``, and the G query heads of a group passed as G query rows over
  the group's KV (exact for decode, where no mask applies). Repeating the KV per query head
  would read G times the bytes, so it is not a fair baseline.
- ``gather + sdpa``: gather the pages into contiguous tensors, then SDPA: what transformers does
  with a paged cache on CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

import fastdecode.ops as ops
from common import ReadProbe, Report, cpu_ms, time_interleaved, time_ms
from fastdecode.ops.memory import zeros

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Config:
    batch: int
    kv_len: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: str

    def kv_bytes(self) -> int:
        """Bytes of K and V one decode step reads."""
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.batch * self.kv_len * self.num_kv_heads * self.head_dim * elem


class Problem:
    """A decode step: query [B, Hq, D] over a paged cache [N, P, Hkv, D] whose blocks are
    handed out in shuffled order, plus the same KV contiguous [B, Hkv, L, D]."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        b, n, p = cfg.batch, cfg.kv_len, cfg.block_size
        m = -(-n // p)
        shape = (b * m, p, cfg.num_kv_heads, cfg.head_dim)
        kw = dict(dtype=cfg.dtype, device=cfg.device)
        self.k_cache, self.v_cache = ops.allocate_kv_cache(*shape, **kw)
        self.k_cache.copy_(torch.randn(shape, **kw))
        self.v_cache.copy_(torch.randn(shape, **kw))
        self.block_tables = torch.randperm(b * m, device=cfg.device).view(b, m).int()
        self.seq_lens = torch.full((b,), n, dtype=torch.int32, device=cfg.device)
        self.query = torch.randn(b, cfg.num_qo_heads, cfg.head_dim, **kw)
        self.out = torch.empty_like(self.query)
        self.k, self.v = self.contiguous_kv()

    def gather(self, dest: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """The sequences' KV as contiguous [B, Hkv, L, D] tensors (written into ``dest`` if
        given)."""
        c = self.cfg
        idx = self.block_tables.long()
        kv = tuple(cache[idx].view(c.batch, -1, c.num_kv_heads, c.head_dim)[:, : c.kv_len]
                   .transpose(1, 2) for cache in (self.k_cache, self.v_cache))
        if dest is None:
            return tuple(t.contiguous() for t in kv)
        for d, t in zip(dest, kv):
            d.copy_(t)
        return dest

    def contiguous_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        shape = (c.batch, c.num_kv_heads, c.kv_len, c.head_dim)
        return self.gather(tuple(zeros(shape, dtype=c.dtype, device=c.device) for _ in "kv"))

    def fastdecode(self, backend: str, caches: Optional[tuple] = None,
                   block_tables: Optional[torch.Tensor] = None):
        k, v = caches or (self.k_cache, self.v_cache)
        tables = self.block_tables if block_tables is None else block_tables
        return lambda: ops.paged_attention(self.query, k, v, tables, self.seq_lens,
                                           out=self.out, backend=backend)

    def in_order_tables(self) -> torch.Tensor:
        """Block tables [B, M] handing out the pool in order: sequence b owns blocks
        b * M .. b * M + M - 1."""
        t = self.block_tables
        return torch.arange(t.numel(), device=t.device, dtype=t.dtype).view_as(t)

    def sdpa_gqa(self):
        q = self.query.unsqueeze(2)  # [B, Hq, 1, D]
        return lambda: F.scaled_dot_product_attention(q, self.k, self.v, enable_gqa=True)

    def sdpa_grouped(self):
        c = self.cfg
        q = self.query.view(c.batch, c.num_kv_heads, -1, c.head_dim)  # [B, Hkv, G, D]
        return lambda: F.scaled_dot_product_attention(q, self.k, self.v)

    def gather_sdpa(self):
        q = self.query.unsqueeze(2)
        def run():
            k, v = self.gather()
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return run

    def check(self, backend: str) -> None:
        """The benchmarked kernel must agree with SDPA before its time means anything."""
        got = self.fastdecode(backend)().float()
        want = self.sdpa_gqa()().squeeze(2).float()
        tol = 1e-4 if self.cfg.dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


PROBE = "read bandwidth probe"


def measure(problem: Problem, backends: list[str], repeat: int, probe: ReadProbe,
            cpu_variants: bool = False) -> dict[str, tuple]:
    """Per method (and the probe): (median wall ms, median process CPU ms or None on cuda),
    timed round-robin. cpu_variants: also time the cpu kernel on a plain torch copy of the
    pools, and on block tables in pool order."""
    dev = problem.cfg.device
    fns = {}
    for name in backends:
        problem.check(name)
        fns[f"fastdecode {name}"] = problem.fastdecode(name)
    if cpu_variants and "cpu" in backends:
        plain = (problem.k_cache.clone(), problem.v_cache.clone())
        fns["fastdecode cpu, plain torch allocation"] = problem.fastdecode("cpu", plain)
        fns["fastdecode cpu, blocks in pool order"] = problem.fastdecode(
            "cpu", block_tables=problem.in_order_tables())
    fns["sdpa contiguous (enable_gqa)"] = problem.sdpa_gqa()
    fns["sdpa contiguous (grouped q)"] = problem.sdpa_grouped()
    fns["gather + sdpa"] = problem.gather_sdpa()
    fns[PROBE] = probe  # last: the methods keep their plot colours in both plots
    times = time_interleaved(fns, device=dev, repeat=repeat)
    return {k: (wall, cpu if dev == "cpu" else None) for k, (wall, cpu) in times.items()}


def rows_for(cfg: Config, times: dict[str, tuple], probe: ReadProbe) -> list[dict]:
    baseline = min(t for k, (t, _) in times.items() if k.startswith("sdpa contiguous"))
    bandwidth = probe.gbps(times[PROBE][0])
    rows = []
    for method, (t, cpu) in times.items():
        gbps = bandwidth if method == PROBE else cfg.kv_bytes() / (t * 1e-3) / 1e9
        row = {"kv_len": cfg.kv_len, "batch": cfg.batch, "method": method, "ms": t, "GB/s": gbps,
               "% of read BW": 100 * gbps / bandwidth}
        if method != PROBE:
            row["speedup vs sdpa"] = baseline / t
        if cpu is not None:
            row["process CPU ms"] = cpu
        rows.append(row)
    return rows


def default_config(args) -> Config:
    cpu = args.device == "cpu"
    pick = lambda value, cpu_default, cuda_default: value or (cpu_default if cpu else cuda_default)
    return Config(batch=pick(args.batch, 64, 64), kv_len=pick(args.kv_len, 2048, 4096),
                  num_qo_heads=pick(args.num_qo_heads, 9, 32),
                  num_kv_heads=pick(args.num_kv_heads, 3, 8),
                  head_dim=pick(args.head_dim, 64, 128), block_size=args.block_size,
                  dtype=DTYPES[pick(args.dtype, "fp32", "bf16")], device=args.device)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default fp32 (cpu) / bf16 (cuda)")
    ap.add_argument("--backends", help="comma-separated fastdecode backends "
                    "(default: cpu on cpu; cuda and triton, where available, on cuda)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--kv-len", type=int)
    ap.add_argument("--num-qo-heads", type=int)
    ap.add_argument("--num-kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", default="256,512,1024,2048,4096",
                    help="KV lengths for the sweep table and plot, at a fixed batch x KV "
                         "length ('' to skip)")
    ap.add_argument("--threads", default=None,
                    help="cpu: comma-separated thread counts for the scaling table "
                         "(default: 1 and torch's current count)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    cfg = default_config(args)
    if args.backends:
        backends = args.backends.split(",")
    elif args.device == "cpu":
        backends = ["cpu"]
    else:
        backends = [b for b in ("cuda", "triton") if ops.is_available(b)]
    report = Report("attention", args.device)
    probe = ReadProbe(args.device)
    report.add_note(
        f"Config: batch {cfg.batch}, KV length {cfg.kv_len}, Hq {cfg.num_qo_heads}, "
        f"Hkv {cfg.num_kv_heads}, head_dim {cfg.head_dim}, block {cfg.block_size}, "
        f"{cfg.dtype}; K + V read per step: {cfg.kv_bytes() / 1e6:.1f} MB.")
    report.add_note(__doc__.split("\n\n", 1)[1].split("\n\n", 1)[1])

    problem = Problem(cfg)
    rows = rows_for(cfg, measure(problem, backends, args.repeat, probe,
                                 cpu_variants=args.device == "cpu"), probe)
    columns = ["method", "ms", "GB/s", "% of read BW", "speedup vs sdpa"]
    if args.device == "cpu":
        columns.append("process CPU ms")
    report.add_table("Default config", rows, columns, csv_name="default")

    if args.device == "cpu" and "cpu" in backends:
        counts = ([int(t) for t in args.threads.split(",")] if args.threads
                  else sorted({1, torch.get_num_threads()}))
        full = torch.get_num_threads()
        scaling = []
        for n in counts:
            torch.set_num_threads(n)
            t = time_ms(problem.fastdecode("cpu"), repeat=args.repeat)
            cpu = cpu_ms(problem.fastdecode("cpu"), repeat=args.repeat)
            scaling.append({"threads": n, "ms": t, "GB/s": cfg.kv_bytes() / (t * 1e-3) / 1e9,
                            "process CPU ms": cpu,
                            "GB/s at CPU ms / threads": cfg.kv_bytes() / (cpu / n * 1e-3) / 1e9})
        torch.set_num_threads(full)
        report.add_table("CPU kernel thread scaling (torch.set_num_threads)", scaling,
                         csv_name="threads")
    del problem

    if args.sweep:
        sweep = []
        # The batch shrinks as sequences grow, so every point reads the default config's KV
        # volume: far more than the last-level cache, as in serving (short sequences in a small
        # batch would be served from cache and overstate the kernel).
        for n in (int(x) for x in args.sweep.split(",")):
            c = replace(cfg, kv_len=n, batch=max(1, cfg.batch * cfg.kv_len // n))
            sweep += rows_for(c, measure(Problem(c), backends, args.repeat, probe), probe)
        report.add_table("KV length sweep (batch x KV length fixed)", sweep,
                         ["kv_len", "batch"] + columns, csv_name="sweep")
        report.add_plot("time per decode step", [r for r in sweep if r["method"] != PROBE],
                        x="kv_len", y="ms", series="method", logy=True)
        report.add_plot("achieved bandwidth", sweep, x="kv_len", y="GB/s", series="method")
    if not args.no_write:
        for path in report.write():
            print("wrote", path)


if __name__ == "__main__":
    main()
