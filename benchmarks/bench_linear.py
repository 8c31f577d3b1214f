"""The fast-linear path's products: the streaming kernel against nn.Linear and oneDNN.

All linear products of one decode step of the 135M Llama-shaped model (30 layers of fused
q/k/v, o, fused gate/up and down, then the LM head: 538 MB of float32 weights, so nothing stays
in cache between calls), at T rows per product, timed round-robin:

- ``streaming``: ``fastdecode::packed_linear`` on panel-packed weights (what the fast-linear
  path runs up to ``fastdecode.models.packed.STREAM_MAX_ROWS`` rows);
- ``nn.Linear``: ``F.linear`` on the ``[out, in]`` weights (MKL; the path beyond that);
- ``oneDNN``: ``mkldnn._linear_pointwise`` on weights pre-packed by
  ``mkldnn._reorder_linear_weight`` (what the fast-linear path used before the kernel).

GB/s = weight bytes / time of the whole set; CPU-time GB/s excludes time spent waiting for a core
on a shared machine.

    python benchmarks/bench_linear.py [--threads 1] [--rows 1,2,4,8,16,32,64,128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common import Report, measure_read_bandwidth, time_interleaved
from fastdecode.models.packed import pack

HIDDEN, INTERMEDIATE, QKV, LAYERS, VOCAB = 576, 1536, 960, 30, 49152


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN),
              (HIDDEN, INTERMEDIATE)] * LAYERS + [(VOCAB, HIDDEN)]
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) for n, k in shapes]
    nbytes = sum(w.nbytes for w in weights)
    packed = [pack(w) for w in weights]
    onednn = torch.backends.mkldnn.is_available()
    reordered = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights] if onednn else []
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k, generator=g) for k in (HIDDEN, INTERMEDIATE)}
        fns = {
            "streaming": lambda: [torch.ops.fastdecode.packed_linear(xs[w.shape[1]], p, None,
                                                                      w.shape[0])
                                  for w, p in zip(weights, packed)],
            "nn.Linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
        }
        if onednn:
            fns["oneDNN"] = lambda: [torch.ops.mkldnn._linear_pointwise(
                xs[w.shape[1]], p, None, "none", [], "") for w, p in zip(weights, reordered)]
        times = time_interleaved(fns, repeat=args.repeat)
        wall_stream, cpu_stream = times["streaming"]
        for name, (wall, cpu) in times.items():
            rows_out.append(dict(rows=rows, method=name, wall_ms=round(wall, 1),
                                 cpu_ms=round(cpu, 1), gb_s=round(nbytes / wall / 1e6, 2),
                                 cpu_gb_s=round(nbytes / cpu / 1e6, 2),
                                 streaming_speedup_cpu=round(cpu / cpu_stream, 2)))
    bandwidth = measure_read_bandwidth("cpu")
    report = Report("linear", device="cpu")
    report.add_note(
        f"One decode step's linear products of the 135M Llama-shaped model ({len(weights)} "
        f"products, {nbytes / 1e6:.0f} MB of float32 weights), {args.threads} thread(s), median "
        f"of {args.repeat} round-robin rounds. Streaming read probe (torch sum of 512 MiB, same "
        f"threads) after the run: {bandwidth:.1f} GB/s. streaming_speedup_cpu = method CPU time "
        "/ streaming CPU time at the same row count.")
    report.add_table("Products per row count", rows_out)
    report.add_plot("weights read (CPU time)", rows_out, x="rows", y="cpu_gb_s", series="method")
    print("wrote", *report.write(Path(args.out)))


if __name__ == "__main__":
    main()
