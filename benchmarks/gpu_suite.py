"""GPU benchmarks of decode attention and sampling, timed on the device.

    python benchmarks/gpu_suite.py attention --out DIR [--budget SECONDS]
    python benchmarks/gpu_suite.py sampling --out DIR [--budget SECONDS]

Timing: each method is captured in a CUDA graph of ``REPLAYS`` back-to-back calls and the graph
is replayed between CUDA events (no Python or launch overhead in the figure); a method that
cannot be captured is timed with events around the same number of back-to-back calls (the
``timing`` column says which). The median of 5 measurements is reported.

Baselines measured in the same run:
- attention: a device-to-device copy of 1 GiB (read + write bytes / time: the bandwidth limit
  the decode kernels are measured against), and torch SDPA on the same keys and values stored
  contiguously ([B, Hkv, L, D], the G query heads of a group as G query rows, no paging);
- sampling: fastdecode's ``torch`` backend (sort-based top-k / top-p, as transformers does it),
  and one read of the logits (``amax``), the bound no sampler beats.

Results: DIR/attention_gpu.{md,csv}, DIR/sampling_gpu.{md,csv}, each naming the device, driver,
versions and command. Configurations run in order until ``--budget`` seconds have passed.
"""

from __future__ import annotations

import argparse
import csv
import platform
import shlex
import statistics
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fastdecode.ops as ops  # noqa: E402
from fastdecode.ops import _backends  # noqa: E402
from fastdecode.ops._params import normalize  # noqa: E402
from common import markdown_table  # noqa: E402

REPLAYS = 20  # calls per graph / per timed stream of launches


def device_time_ms(fn: Callable[[], object], capture: bool = True) -> tuple[float, str]:
    """(median ms per call, "graph" | "stream") of fn() on the current CUDA stream: replays of
    a CUDA graph of REPLAYS calls when ``capture`` and fn is capturable, else REPLAYS launches.
    Calls that draw from torch's default CUDA generator and sync the host (ops.sample's checks)
    must not be captured: a failed capture can leave that generator unusable."""
    for _ in range(3):  # warm-up: compiles, autotuning, allocator
        fn()
    torch.cuda.synchronize()
    run, how = (lambda: [fn() for _ in range(REPLAYS)]), "stream"
    if capture:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(REPLAYS):
                    fn()
            graph.replay()
            run, how = graph.replay, "graph"
        except Exception:  # not capturable (a host sync inside): time the launches instead
            torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / REPLAYS)
    return statistics.median(samples), how


@lru_cache(maxsize=None)
def gpu_info() -> dict[str, str]:
    import triton

    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip().splitlines()
    props = torch.cuda.get_device_properties(0)
    return {"device": f"{props.name}, {props.multi_processor_count} SMs, "
                      f"{props.total_memory / 2**30:.0f} GiB",
            "driver": driver[0] if driver else "unknown",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                        f"CUDA {torch.version.cuda}, triton {triton.__version__}",
            "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv)}


def write(out: Path, name: str, notes: list[str], rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {name} (GPU)", ""] + [f"- {k}: {v}" for k, v in gpu_info().items()] + [""]
    lines += notes + ["", markdown_table(rows) if rows else "(no configuration finished)", ""]
    (out / f"{name}_gpu.md").write_text("\n".join(lines))
    if rows:
        with (out / f"{name}_gpu.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"{name}: {len(rows)} rows written to {out}", flush=True)


# ------------------------------------------------------------------------------------ attention
def copy_gbps() -> float:
    """Device-to-device copy bandwidth: (read + write bytes) / time, 1 GiB each way."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = device_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def decode_case(batch: int, kv_len: int, hq: int, hkv: int, d: int = 128, p: int = 16):
    """A bf16 decode step on the GPU, every sequence ``kv_len`` tokens in shuffled blocks of p:
    (query [B, Hq, D], k_cache, v_cache [N, P, Hkv, D], block_tables [B, M], seq_lens [B])."""
    m = -(-kv_len // p)
    shape = (batch * m, p, hkv, d)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    tables = torch.randperm(batch * m, device="cuda").view(batch, m).int()
    lens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    return query, k_cache, v_cache, tables, lens


def attention_rows(batch: int, kv_len: int, hq: int, hkv: int, copy: float) -> list[dict]:
    d = 128
    query, k_cache, v_cache, tables, lens = decode_case(batch, kv_len, hq, hkv, d)
    out = torch.empty_like(query)
    idx = tables.long()
    k, v = (c[idx].view(batch, -1, hkv, d)[:, :kv_len].transpose(1, 2).contiguous()
            for c in (k_cache, v_cache))
    q_grouped = query.view(batch, hkv, hq // hkv, d)
    methods = {"sdpa contiguous": lambda: F.scaled_dot_product_attention(q_grouped, k, v)}
    want = methods["sdpa contiguous"]().reshape(batch, hq, d).float()
    for name in ("cuda", "triton"):
        if ops.is_available(name):
            fn = (lambda b: lambda: ops.paged_attention(query, k_cache, v_cache, tables, lens,
                                                        out=out, backend=b))(name)
            torch.testing.assert_close(fn().float(), want, atol=3e-2, rtol=3e-2)
            methods[f"fastdecode {name}"] = fn
    kv_bytes = 2 * batch * kv_len * hkv * d * 2
    rows = []
    for name, fn in methods.items():
        ms, how = device_time_ms(fn)
        gbps = kv_bytes / (ms * 1e-3) / 1e9
        rows.append({"GQA": hq // hkv, "batch": batch, "kv_len": kv_len, "method": name,
                     "us": round(ms * 1e3, 1), "GB/s": round(gbps), "% of copy BW":
                     round(100 * gbps / copy, 1), "timing": how})
    sdpa = rows[0]["us"]
    for row in rows:
        row["speedup vs sdpa"] = round(sdpa / row["us"], 2)
    return rows


def attention(args) -> None:
    start = time.monotonic()
    copy = copy_gbps()
    notes = ["Decode attention, bf16, head_dim 128, block 16, blocks in shuffled order; batch x "
             f"KV length up to 2^21 tokens. Copy bandwidth (1 GiB, read + write): {copy:.0f} "
             "GB/s. GB/s: K + V bytes of the step / time."]
    rows = []
    for hq, hkv in ((32, 8), (64, 8)):  # GQA 4 and 8
        for batch in (1, 16, 64, 256):
            for kv_len in (1024, 4096, 16384, 32768):
                if batch * kv_len > 2**21 or time.monotonic() - start > args.budget:
                    continue
                rows += attention_rows(batch, kv_len, hq, hkv, copy)
                torch.cuda.empty_cache()
                write(args.out, "attention", notes, rows)  # after each: a timeout keeps them


# ------------------------------------------------------------------------------------- sampling
def sampling_rows(batch: int, vocab: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, vocab, device="cuda", generator=gen) * 2
    seen = torch.randint(0, vocab, (batch, 512), device="cuda", generator=gen)
    seeds = torch.arange(batch, device="cuda")
    params = dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1,
                  seen_tokens=seen, seeds=seeds, offsets=seeds)

    def prepared(backend: str) -> Callable[[], torch.Tensor]:
        """The backend's sampler on parameter tensors prepared once, as an engine step calls it
        (no argument checks, no host syncs): captured in a graph."""
        tensors = normalize(logits, **{k: v for k, v in params.items()
                                       if k not in ("seeds", "offsets")})
        impl = _backends._load(backend)
        return lambda: impl.sample(logits, tensors, seeds, seeds)

    # (name, call, capture): ops.sample (argument checks with host syncs) is timed as launched.
    methods = []
    for name in ("cuda", "triton"):
        if ops.is_available(name):
            methods.append((f"fastdecode {name} (prepared)", prepared(name), True))
            methods.append((f"fastdecode {name} (ops.sample)",
                            (lambda b: lambda: ops.sample(logits, backend=b, **params))(name),
                            False))
    methods.append(("torch (sort)", lambda: ops.sample(logits, backend="torch", **params), False))
    methods.append(("read logits once", lambda: logits.amax(), True))
    rows = []
    for name, fn, capture in methods:
        ms, how = device_time_ms(fn, capture)
        rows.append({"batch": batch, "vocab": vocab, "method": name, "us": round(ms * 1e3, 1),
                     "timing": how})
    base = next(row["us"] for row in rows if row["method"] == "torch (sort)")
    read = rows[-1]["us"]
    for row in rows:
        row["speedup vs sort"] = round(base / row["us"], 1)
        row["read bound / time"] = f"{read / row['us']:.0%}"
    return rows


def sampling(args) -> None:
    start = time.monotonic()
    notes = ["Sampling: float32 logits; repetition penalty 1.1 over 512 seen ids, temperature "
             "0.7, top-k 50, top-p 0.9, seeded draws."]
    rows = []
    for batch in (64, 1, 256):  # the acceptance case (batch 64) first
        for vocab in (128256, 32000, 256000):
            if time.monotonic() - start <= args.budget:
                rows += sampling_rows(batch, vocab)
                write(args.out, "sampling", notes, rows)  # after each: a timeout keeps them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=["attention", "sampling"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--budget", type=float, default=40.0,
                    help="seconds after which no new configuration starts")
    args = ap.parse_args()
    torch.manual_seed(0)
    {"attention": attention, "sampling": sampling}[args.suite](args)


if __name__ == "__main__":
    main()
