"""Shared benchmark helpers: timing, memory bandwidth, and result files.

Typical use::

    from common import Report, ReadProbe, measure_read_bandwidth, time_interleaved, time_ms

    ms = time_ms(lambda: op(x), device="cpu")             # median of timed runs, after warmup
    both = time_interleaved({"mine": f, "baseline": g})   # {name: (wall ms, CPU ms)}, round-robin
    bw = measure_read_bandwidth("cpu")                    # GB/s of a large streaming read
    probe = ReadProbe("cpu")                              # the same read, to time among others
    report = Report("attention", device="cpu")            # -> benchmarks/results/attention_cpu.*
    report.add_table("Default config", rows)               # rows: list of dicts, one per line
    report.add_plot("KV sweep", rows, x="kv_len", y="ms", series="method")
    report.add_note("what the baseline is, and why")
    report.write()                                         # .md (+ machine, versions, command),
                                                           # one .csv per table, one .png

Machines are shared and noisy: compare against baselines measured in the same run, and prefer
the median (``time_ms``) over the mean.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The test-model factories (tests/tiny.py) are importable by the benchmarks as ``tiny``.
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 3,
            repeat: int = 15, min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls; runs ``repeat``
    times, or more until ``min_time_s`` has passed. CUDA work is synchronised around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_interleaved(fns: dict[str, Callable[[], object]], *, device: str = "cpu",
                     warmup: int = 2, repeat: int = 15) -> dict[str, tuple[float, float]]:
    """{name: (median wall ms, median process CPU ms)} of each ``fns[name]()``, timed round-robin
    (one call of each per round) so that load changes on a shared machine hit all of them alike.
    CPU time sums all threads and excludes time spent waiting for a core."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]) * 1e3, statistics.median(cpu[k]) * 1e3)
            for k in fns}


def cpu_ms(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 15) -> float:
    """Median process CPU time of ``fn()`` in milliseconds, summed over threads (CPU work only).

    On a shared machine wall time includes waiting for a core; CPU time does not (though it
    does include threads spinning at a barrier), so ``cpu_ms / threads`` bounds what the wall
    time would be on an idle machine with perfect scaling."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


class ReadProbe:
    """A streaming read of ``nbytes`` (``sum()`` of a float32 tensor far larger than the caches,
    allocated like the KV pools, in huge pages where the machine allows): time ``probe()``
    among the measured methods, in the same round-robin, to get the read bandwidth the machine
    offered while they ran (shared machines drift)."""

    def __init__(self, device: str = "cpu", nbytes: int = 1 << 29):
        from fastdecode.ops.memory import zeros
        self.nbytes = nbytes
        self.x = zeros((nbytes // 4,), dtype=torch.float32, device=device).fill_(1.0)

    def __call__(self) -> torch.Tensor:
        return self.x.sum()

    def gbps(self, ms: float) -> float:
        return self.nbytes / (ms * 1e-3) / 1e9


def measure_read_bandwidth(device: str = "cpu", nbytes: int = 1 << 29) -> float:
    """Achievable memory read bandwidth in GB/s: the median time of a :class:`ReadProbe`, with
    torch's current thread count."""
    probe = ReadProbe(device, nbytes)
    return probe.gbps(time_ms(probe, device=device, warmup=2, repeat=10))


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, str]:
    """The machine and library versions a result was measured with."""
    info = {
        "cpu": f"{_cpu_name()}, {os.cpu_count()} logical cores, "
               f"torch threads {torch.get_num_threads()}",
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def markdown_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """Rows (dicts) as a GitHub markdown table; floats get 4 significant digits."""
    columns = columns or list(rows[0])
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class _Plot:
    title: str
    rows: list[dict]
    x: str
    y: str
    series: str
    logx: bool
    logy: bool


@dataclass
class Report:
    """Collects tables, plots and notes; ``write`` saves them under benchmarks/results/ as
    ``{name}_{device}.md``, ``{name}_{device}[_{table}].csv`` and ``{name}_{device}.png``."""

    name: str
    device: str
    _sections: list[tuple[str, object]] = field(default_factory=list)
    _plots: list[_Plot] = field(default_factory=list)

    def add_table(self, title: str, rows: list[dict], columns: Optional[list[str]] = None, *,
                  csv_name: Optional[str] = None):
        """A table of ``rows``; its CSV is ``{name}_{device}[_{csv_name}].csv`` (the suffix
        defaults to the title, and is left out when the report has a single table)."""
        columns = columns or list(rows[0])
        self._sections.append(("table", (title, rows, columns, csv_name)))
        print(f"\n## {title}\n{markdown_table(rows, columns)}", flush=True)

    def add_note(self, text: str) -> None:
        self._sections.append(("note", text))

    def add_plot(self, title: str, rows: list[dict], *, x: str, y: str, series: str,
                 logx: bool = True, logy: bool = False) -> None:
        """One line per distinct ``row[series]``: ``row[y]`` against ``row[x]``."""
        self._plots.append(_Plot(title, rows, x, y, series, logx, logy))

    def write(self, out_dir: Path = RESULTS_DIR) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.name}_{self.device.split(':')[0]}"
        command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)
        md = [f"# {self.name} benchmark ({self.device})", "",
              f"Command: `{command}`", "",
              *[f"- {k}: {v}" for k, v in machine_info(self.device).items()], ""]
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1):
            md += [f"**Shared machine**: load average {load:.1f} on {os.cpu_count()} logical "
                   "cores while writing; wall times include waiting for a core, so compare "
                   "methods within this run (and their process CPU time where reported).", ""]
        paths = []
        tables = [s for s in self._sections if s[0] == "table"]
        for kind, body in self._sections:
            if kind == "note":
                md += [body, ""]
                continue
            title, rows, columns, csv_name = body
            md += [f"## {title}", "", markdown_table(rows, columns), ""]
            slug = re.sub(r"\W+", "_", (csv_name or title).lower()).strip("_")
            slug = "" if len(tables) == 1 else "_" + slug
            path = out_dir / f"{stem}{slug}.csv"
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            paths.append(path)
        if self._plots:
            paths.append(self._write_plot(out_dir / f"{stem}.png"))
            md += [f"![{self.name}]({stem}.png)", ""]
        md_path = out_dir / f"{stem}.md"
        md_path.write_text("\n".join(md))
        return [md_path] + paths

    def _write_plot(self, path: Path) -> Path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self._plots), figsize=(6 * len(self._plots), 4.2),
                                 squeeze=False)
        for ax, plot in zip(axes[0], self._plots):
            for label in dict.fromkeys(r[plot.series] for r in plot.rows):
                pts = [(r[plot.x], r[plot.y]) for r in plot.rows if r[plot.series] == label]
                ax.plot(*zip(*pts), marker="o", label=str(label))
            ax.set_title(plot.title)
            ax.set_xlabel(plot.x)
            ax.set_ylabel(plot.y)
            if plot.logx:
                ax.set_xscale("log", base=2)
            if plot.logy:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{self.name} ({self.device})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
