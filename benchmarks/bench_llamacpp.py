"""Batch-1 greedy decoding against llama.cpp: fastdecode.generate, model.generate and llama.cpp
(llama-cpp-python) on the same 135M Llama-shaped float32 weights, in one process, alternating.

llama.cpp runs those weights converted to GGUF f32 by llama.cpp's own converter,
``convert_hf_to_gguf.py`` from a llama.cpp source tree (the ``vendor/llama.cpp`` folder of
llama-cpp-python's source distribution carries the one matching the installed library). Where
``llama_cpp`` is not installed or no converter is given, llama.cpp is skipped with the reason
printed and the other two systems still run.

    pip download --no-deps --no-binary :all: llama-cpp-python    # sdist: vendor/llama.cpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python --no-binary llama-cpp-python
    python benchmarks/bench_llamacpp.py --llama-cpp-source path/to/vendor/llama.cpp

Per thread count (``torch.set_num_threads`` and llama.cpp's ``n_threads``), each round runs every
system once, in an order rotated per round, and the median over rounds is reported. The decode
rate excludes the prefill: (new tokens - 1) / time from the first generated token to the last.
Weights read = parameter bytes (the tied embedding counted once, as every system reads it once
per step, as the LM head) / decode step time. Writes benchmarks/results/llamacpp_cpu.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import transformers

import fastdecode
from common import Report, markdown_table, measure_read_bandwidth
from tiny import default_model

NAMES = {"fd": "fastdecode.generate", "hf": "model.generate", "llama": "llama.cpp"}


def _now() -> tuple[float, float]:
    """(wall time, process CPU time summed over threads), in seconds."""
    return time.perf_counter(), time.process_time()


class _Stamps:
    """A ``model.generate`` streamer that keeps the arrival time of each generated token."""

    def __init__(self):
        self.times: list[tuple[float, float]] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(_now())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _save_checkpoint(model, directory: Path) -> None:
    """save_pretrained plus a byte-fallback BPE tokenizer over the model's vocabulary, the kind
    llama.cpp's converter maps to its "llama" vocabulary (the ids are all that is used here)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    vocab.update({f"\u2581t{i}": i for i in range(len(vocab), model.config.vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    model.save_pretrained(directory)


def _llama_cpp_unavailable(source: Optional[Path]) -> Optional[str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama_cpp is not installed ({exc})"
    if source is None:
        return "no --llama-cpp-source given (a llama.cpp tree with convert_hf_to_gguf.py)"
    if not (source / "convert_hf_to_gguf.py").is_file():
        return f"{source} has no convert_hf_to_gguf.py"
    return None


def _convert(model, source: Path, directory: Path) -> Path:
    """The model as GGUF f32, by llama.cpp's converter (run as a child process)."""
    hf_dir, gguf = directory / "hf", directory / "model-f32.gguf"
    _save_checkpoint(model, hf_dir)
    run = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(hf_dir),
                          "--outtype", "f32", "--outfile", str(gguf)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{run.stderr[-3000:]}")
    return gguf


def _llama_runner(gguf: Path, threads: int, prompt: list[int], new_tokens: int):
    """A callable decoding ``new_tokens`` greedily after ``prompt`` with llama.cpp; it returns
    (token ids, arrival (wall, CPU) times of each)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads,
                          n_ctx=len(prompt) + new_tokens + 16, n_batch=len(prompt),
                          verbose=False)
    vocab = llm.n_vocab()

    def next_token() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    def run() -> tuple[list[int], list[tuple[float, float]]]:
        llm.reset()
        llm.eval(prompt)
        tokens, times = [next_token()], [_now()]
        while len(tokens) < new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(next_token())
            times.append(_now())
        return tokens, times

    return run


def _hf_runner(fn: Callable, model, ids: torch.Tensor, new_tokens: int):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids))

    def run() -> tuple[list[int], list[tuple[float, float]]]:
        stamps = _Stamps()
        out = fn(model, ids, streamer=stamps, **kwargs)
        return out[0, ids.shape[1]:].tolist(), stamps.times

    return run


def _agreement(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "all equal" if same is None else f"equal up to token {same}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--llama-cpp-source", type=Path, default=None,
                        help="llama.cpp source tree holding convert_hf_to_gguf.py")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model = default_model(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))
    load_start = os.getloadavg()[0]
    skipped = _llama_cpp_unavailable(args.llama_cpp_source)
    if skipped:
        print(f"llama.cpp skipped: {skipped}", flush=True)
    rows, plot, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = None if skipped else _convert(model, args.llama_cpp_source, Path(tmp))
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            runs = {"fd": _hf_runner(fastdecode.generate, model, prompt, args.new_tokens),
                    "hf": _hf_runner(lambda m, ids, **kw: m.generate(ids, **kw), model, prompt,
                                     args.new_tokens)}
            if gguf is not None:
                runs["llama"] = _llama_runner(gguf, threads, prompt[0].tolist(), args.new_tokens)
            tokens = {k: fn()[0] for k, fn in runs.items()}  # warm-up, and the tokens compared
            rates: dict[str, list[float]] = {k: [] for k in runs}
            cpu_ms: dict[str, list[float]] = {k: [] for k in runs}
            order = list(runs)
            for r in range(args.rounds):
                for key in order[r % len(order):] + order[:r % len(order)]:
                    _, times = runs[key]()
                    (wall0, cpu0), (wall1, cpu1) = times[0], times[-1]
                    rates[key].append((len(times) - 1) / (wall1 - wall0))
                    cpu_ms[key].append((cpu1 - cpu0) / (len(times) - 1) * 1e3)
            bandwidth = measure_read_bandwidth("cpu")
            median = {k: statistics.median(v) for k, v in rates.items()}
            for key, values in rates.items():
                row = dict(threads=threads, system=NAMES[key],
                           decode_tok_s=round(median[key], 2),
                           tok_s_range=f"{min(values):.1f}-{max(values):.1f}",
                           ms_per_step=round(1e3 / median[key], 1),
                           cpu_ms_per_step=round(statistics.median(cpu_ms[key]), 1),
                           weights_gb_s=round(weight_bytes * median[key] / 1e9, 2),
                           vs_model_generate=round(median[key] / median["hf"], 2))
                if "llama" in median:
                    row["vs_llama_cpp"] = round(median[key] / median["llama"], 2)
                rows.append(row)
                plot.append(dict(threads=threads, tok_s=row["decode_tok_s"], system=row["system"]))
            print(markdown_table(rows[-len(rates):]), flush=True)  # each thread count as it ends
            notes.append(f"{threads} thread(s): streaming read probe {bandwidth:.1f} GB/s; greedy "
                         f"tokens fastdecode vs model.generate: {_agreement(tokens['fd'], tokens['hf'])}"
                         + (f", vs llama.cpp: {_agreement(tokens['fd'], tokens['llama'])}"
                            if "llama" in tokens else ""))
    report = Report("llamacpp", device="cpu")
    versions = f"transformers {transformers.__version__}, fastdecode {fastdecode.__version__}"
    if not skipped:
        import llama_cpp
        versions += f", llama-cpp-python {llama_cpp.__version__}"
    report.add_note(
        f"Batch-1 greedy decoding of the 135M Llama-shaped model (random weights, float32, "
        f"{weight_bytes / 2**20:.0f} MiB of parameters), {args.prompt_len}-token prompt, "
        f"{args.new_tokens} new tokens; {versions}. Median of {args.rounds} rounds; each round "
        "runs every system once (order rotated per round). Decode rate excludes the prefill. "
        "cpu_ms_per_step: process CPU time per decode step, all threads summed (at 1 thread, "
        "what the step would take on an idle core; spinning threads count too)."
        + (f" llama.cpp skipped: {skipped}." if skipped else
           " llama.cpp reads the same weights as GGUF f32 made by its own convert_hf_to_gguf.py."))
    report.add_note(f"Load average (1 min): {load_start:.2f} at start, "
                    f"{os.getloadavg()[0]:.2f} at end. " + " ".join(notes))
    report.add_table("Batch-1 decode", rows)
    report.add_plot("decode tokens/s", plot, x="threads", y="tok_s", series="system")
    for path in report.write(Path(args.out)):
        print("wrote", path)


if __name__ == "__main__":
    main()
