"""Serving throughput and latency: fastdecode.Engine against transformers' continuous batching
(``model.generate_batch``) and CTranslate2's ``Generator.generate_batch``.

Workload (fixed seed): ``--num-requests`` prompts of random ids with lengths uniform in
[16, 512], each generating exactly ``--max-new-tokens`` tokens (greedy, EOS ignored so every
system does the same work), all submitted at t=0. Model: a 135M Llama-shaped config with random
weights, float32, CPU. Reported per system: generated tokens/s, time to first token (p50 / p99,
from submission), inter-token latency (mean gap between consecutive tokens of a request).

Each system's raw numbers are kept in ``results/serving_raw.json`` keyed by the workload, so the
slow baselines can run once (``--systems hf,ct2``) and the engine later (``--systems engine``);
the table, CSV and plot are rebuilt from every system measured on the same workload.

    PYTHONPATH=. python benchmarks/bench_serving.py          # everything, full workload
    PYTHONPATH=. python benchmarks/bench_serving.py --systems engine --num-requests 8 \
        --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"engine": "fastdecode.Engine", "hf": "transformers generate_batch",
          "ct2": "CTranslate2 generate_batch"}


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                      tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def workload(num_requests: int, seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 513, size=num_requests)
    # Ids avoid the special tokens so no system treats a prompt token specially.
    return [rng.integers(3, vocab, size=int(n)).tolist() for n in lengths]


def summarize(t0: float, t_end: float, token_times: list[list[float]]) -> dict:
    """token_times[r]: wall-clock time of each generated token of request r."""
    ttft = np.array([ts[0] - t0 for ts in token_times])
    gaps = np.concatenate([np.diff(ts) for ts in token_times if len(ts) > 1] or [np.zeros(0)])
    generated = sum(len(ts) for ts in token_times)
    return {"seconds": t_end - t0, "generated_tokens": generated,
            "tokens_per_s": generated / (t_end - t0),
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_mean_ms": float(gaps.mean() * 1e3) if gaps.size else float("nan")}


def run_engine(model, prompts, args) -> dict:
    from fastdecode import Engine, SamplingParams
    engine = Engine(model, block_size=args.block_size, num_blocks=args.num_blocks,
                    max_batch_tokens=args.max_batch_tokens)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            times.setdefault(out.request_id, []).extend([now] * len(out.new_ids))
    res = summarize(t0, time.perf_counter(), [times[i] for i in ids])
    res["preemptions"] = engine.stats["preemptions"]
    return res


def run_hf(model, prompts, args) -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=args.num_blocks, page_size=args.block_size,
                                  max_batch_tokens=args.max_batch_tokens)
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                               record_timestamps=True)
    t_end = time.perf_counter()
    by_prompt = {tuple(o.prompt_ids): o for o in out.values()}
    counts = sorted({len(o.generated_tokens) for o in out.values()})
    if len(out) != len(prompts) or counts != [args.max_new_tokens]:
        raise RuntimeError(f"generate_batch returned {len(out)} requests with {counts} tokens")
    return summarize(t0, t_end, [by_prompt[tuple(p)].timestamps for p in prompts])


def _save_for_ctranslate2(model, directory: str) -> None:
    """save_pretrained and a word-level tokenizer over the vocabulary (the converter needs one)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)
    model.save_pretrained(directory)


def run_ct2(model, prompts, args) -> dict:
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, ct_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "ct2")
        _save_for_ctranslate2(model, hf_dir)
        TransformersConverter(hf_dir).convert(ct_dir, quantization="float32")
        gen = ctranslate2.Generator(ct_dir, device="cpu", compute_type="float32",
                                    intra_threads=args.threads)
        tokens = [[f"t{i}" for i in p] for p in prompts]
        stamps: list[list[float]] = [[] for _ in prompts]

        def on_token(step) -> bool:
            stamps[step.batch_id].append(time.perf_counter())
            return False

        t0 = time.perf_counter()
        results = gen.generate_batch(tokens, max_length=args.max_new_tokens,
                                     min_length=args.max_new_tokens, end_token=[],
                                     include_prompt_in_result=False, callback=on_token)
        t_end = time.perf_counter()
    # The callback also reports prompt tokens that are force-decoded for variable-length inputs:
    # a request's generated tokens are its last len(result) callbacks.
    counts = [len(r.sequences_ids[0]) for r in results]
    if any(c != args.max_new_tokens for c in counts):
        raise RuntimeError(f"CTranslate2 generated {sorted(set(counts))} tokens, expected "
                           f"{args.max_new_tokens}")
    return summarize(t0, t_end, [s[-c:] for s, c in zip(stamps, counts)])


def environment() -> dict:
    import transformers
    env = machine_info("cpu")
    # Called once the run is over: the load it ran beside, not the load before it.
    env.pop("load average (1 min) at start", None)
    env["load average (1 min) after the run"] = f"{os.getloadavg()[0]:.2f}"
    env["transformers"] = transformers.__version__
    try:
        import ctranslate2
        env["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        pass
    env["command"] = "python " + " ".join(sys.argv)
    return env


def report(raw: dict, key: str) -> None:
    runs = raw[key]
    rows = []
    for name in (n for n in LABELS if n in runs):
        r = runs[name]
        rows.append({"system": LABELS[name], "tokens/s": r["tokens_per_s"],
                     "total s": r["seconds"], "TTFT p50 s": r["ttft_p50_s"],
                     "TTFT p99 s": r["ttft_p99_s"], "ITL ms": r["itl_mean_ms"],
                     **{f"vs {LABELS[b]}": (f"{r['tokens_per_s'] / runs[b]['tokens_per_s']:.2f}x"
                                           if b in runs else "-") for b in ("hf", "ct2")}})
    table = markdown_table(rows)
    lines = ["# Serving benchmark", "", f"Workload: {key}.", "", table, "",
             "Generated tokens only; TTFT from submission (every request is submitted at t=0); "
             "ITL = mean gap between consecutive tokens of a request. The machine may be shared "
             "with other jobs: each run records the load average it ran beside; systems measured "
             "at different times under different load compare only roughly. Each system's run:",
             ""]
    lines += [f"- {LABELS[name]}: " + "; ".join(f"{k}: {v}" for k, v in runs[name]["env"].items())
              for name in LABELS if name in runs]
    (RESULTS / "serving.md").write_text("\n".join(lines) + "\n")
    with (RESULTS / "serving.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["system"] for r in rows]
    for ax, (field, title) in zip(axes, [("tokens/s", "generated tokens/s (higher is better)"),
                                         ("TTFT p50 s", "TTFT p50 s (lower is better)"),
                                         ("ITL ms", "inter-token latency ms")]):
        ax.barh(names, [r[field] for r in rows], color=["C0", "C1", "C2"][:len(rows)])
        ax.set_title(title, fontsize=9)
    fig.suptitle(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "serving.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="engine,hf,ct2",
                    help="comma-separated subset of engine, hf, ct2")
    ap.add_argument("--skip-baselines", action="store_true", help="same as --systems engine")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="CPU threads of every system (torch intra-op, CTranslate2 intra)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    systems = ["engine"] if args.skip_baselines else args.systems.split(",")
    model = build_model(args.seed)
    prompts = workload(args.num_requests, args.seed, model.config.vocab_size)
    key = (f"{args.num_requests} requests, prompts 16-512 (sum {sum(map(len, prompts))}), "
           f"{args.max_new_tokens} new tokens, seed {args.seed}, block {args.block_size}, "
           f"{args.num_blocks} blocks, {args.max_batch_tokens} batch tokens, "
           f"{args.threads} threads")
    RESULTS.mkdir(exist_ok=True)
    raw_path = RESULTS / "serving_raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    runners = {"engine": run_engine, "hf": run_hf, "ct2": run_ct2}
    for name in systems:
        with torch.no_grad():
            res = runners[name](model, prompts, args)
        res["env"] = environment()
        print(f"{LABELS[name]}: {json.dumps(res)}", flush=True)
        raw = json.loads(raw_path.read_text()) if raw_path.exists() else raw  # runs may overlap
        raw.setdefault(key, {})[name] = res
        raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    report(raw, key)


if __name__ == "__main__":
    main()
