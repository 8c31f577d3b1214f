"""Launch-configuration sweep of the Triton decode-attention kernel on a GPU, for the next
choice of defaults (``fastdecode/triton/attention.py``: ``attention_config``, ``PARTITION_SIZE``).

    python benchmarks/gpu_tune_attention.py --out DIR [--budget SECONDS]

The decode form (bf16, head_dim 128, block 16, shuffled blocks; GQA 4 and 8) at the shapes where
the kernel trails SDPA on contiguous KV (batch >= 16) and at batch 1 with 1k-32k tokens, for each
candidate (KV tokens per tile, warps, pipeline stages, split-KV partition size). Each candidate
is checked against the default's output, then timed as ``gpu_suite.py`` times (CUDA-graph replay
between CUDA events). Results: DIR/tune_attention_gpu.{md,csv}, written after every shape, with
the default's time and each candidate's speedup over it; the best candidate per shape is marked.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from gpu_suite import decode_case, device_time_ms, write
from fastdecode.triton import attention as tri

# (block_n, num_warps, num_stages, partition_size); None: the shipped default.
CANDIDATES = [None, (64, 4, 3, None), (64, 8, 2, None), (128, 4, 2, None), (128, 8, 2, None),
              (128, 8, 3, None), (32, 4, 2, None), (64, 4, 2, 1024), (64, 4, 2, 2048),
              (128, 8, 2, 2048), (64, 4, 4, None), (128, 4, 3, 1024), (128, 8, 2, 1024),
              (32, 4, 2, 1024)]
# (batch, kv_len): where the kernel trails SDPA, and batch 1 from short to long KV (the partition
# size, fixed for batch invariance, sets how many programs a batch-1 step gets).
SHAPES = [(64, 4096), (16, 16384), (256, 1024), (1, 32768), (1, 4096), (1, 1024)]
HEADS = [(32, 8), (64, 8)]  # GQA 4, 8


def _with(candidate):
    """attention_config wrapper returning the candidate's tile / warps / stages for the decode
    variant, and the partition size to pass (None: default)."""
    default = tri.attention_config
    if candidate is None:
        return default, None
    block_n, warps, stages, partition = candidate

    def config(*args, **kwargs):
        cfg = default(*args, **kwargs)
        if cfg.packed:
            return cfg
        return dataclasses.replace(cfg, block_n=block_n, num_warps=warps, num_stages=stages)
    return config, partition


def shape_rows(batch: int, kv_len: int, hq: int, hkv: int) -> list[dict]:
    d, p, dtype = 128, 16, torch.bfloat16
    m = -(-kv_len // p)
    query, k_cache, v_cache, tables, lens = decode_case(batch, kv_len, hq, hkv, d, p)
    kv_bytes = 2 * batch * kv_len * hkv * d * 2
    reference, rows = None, []
    original = tri.attention_config
    for candidate in CANDIDATES:
        config, partition = _with(candidate)
        tri.attention_config = config
        tri._plan.cache_clear()
        out = torch.empty_like(query)
        part = partition or tri.PARTITION_SIZE
        ws = torch.empty(max(tri.workspace_size(batch, hq, d, m, p, part), 1),
                         dtype=torch.float32, device="cuda")

        def call():
            tri.paged_attention(query, k_cache, v_cache, tables, lens, None, out,
                                scale=d ** -0.5, causal=True, softcap=0.0, sliding_window=0,
                                alibi_slopes=None, workspace=ws, partition_size=part)
            return out
        try:
            got = call().float()
            if reference is None:
                reference = got.clone()
            torch.testing.assert_close(got, reference, atol=2e-2, rtol=2e-2)
            ms, how = device_time_ms(call)
            note = how
        except Exception as exc:  # a candidate that does not compile or run: reported, skipped
            ms, note = float("nan"), f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        finally:
            tri.attention_config = original
            tri._plan.cache_clear()
        cfg = original(dtype, d, hq // hkv, False)
        block_n, warps, stages, _ = candidate or (cfg.block_n, cfg.num_warps, cfg.num_stages, None)
        rows.append({"GQA": hq // hkv, "batch": batch, "kv_len": kv_len, "block_n": block_n,
                     "warps": warps, "stages": stages, "partition": part,
                     "default": candidate is None, "us": round(ms * 1e3, 1),
                     "GB/s": round(kv_bytes / (ms * 1e-3) / 1e9) if ms == ms else None,
                     "timing": note})
    base = rows[0]["us"]
    timed = [r for r in rows if r["us"] == r["us"]]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    for row in rows:
        row["speedup vs default"] = round(base / row["us"], 3) if row["us"] == row["us"] else None
        row["best"] = row is best
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=100.0, help="seconds; shapes run in "
                        "order until it is spent")
    args = parser.parse_args()
    start, rows = time.monotonic(), []
    notes = ["Triton decode attention, bf16, head_dim 128, block 16, shuffled blocks: launch "
             "candidates against the shipped default (first row of each shape). GB/s: K + V "
             "bytes / time."]
    for batch, kv_len in SHAPES:
        for hq, hkv in HEADS:
            if time.monotonic() - start > args.budget:
                break
            rows += shape_rows(batch, kv_len, hq, hkv)
            torch.cuda.empty_cache()
            write(args.out, "tune_attention", notes, rows)


if __name__ == "__main__":
    main()
