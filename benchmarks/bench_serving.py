"""Serving throughput and latency: fastdecode.Engine (prefix cache on, and off) against vLLM's CPU
build, transformers' continuous batching (``model.generate_batch``) and CTranslate2's
``Generator.generate_batch``.

Workloads (fixed seed), all requests submitted at t=0, each generating exactly
``--max-new-tokens`` tokens (greedy, EOS ignored so every system does the same work):
``random``: ``--num-requests`` prompts of random ids with lengths uniform in [16, 512];
``shared-prefix``: one system prompt of ``--system-len`` random ids followed by a distinct
suffix of 16-64 ids per request (a chat service's shared system prompt). Model: a 135M
Llama-shaped config with random weights, float32, CPU. Reported per system: generated tokens/s,
time to first token (p50 / p99, from submission), inter-token latency (mean gap between
consecutive tokens of a request). ``--rounds R`` runs the systems R times, alternated, and
reports each system's median round.

vLLM (``vllm``, ``vllm-nocache``: its prefix cache on / off) runs in its own environment
(``--vllm-python``, default ``$FASTDECODE_VLLM_PYTHON``), in a process that exists only while
it is timed (its idle workers spin), through ``benchmarks/vllm_baseline.py``.

Each system's raw numbers are kept in ``results/serving_raw.json`` keyed by the workload, so the
slow baselines can run once (``--systems hf,ct2``) and the engine later (``--systems engine``);
the table, CSV and plot are rebuilt from every system measured on the same workload.

    PYTHONPATH=. python benchmarks/bench_serving.py          # everything, full workload
    PYTHONPATH=. python benchmarks/bench_serving.py --systems engine --num-requests 8 \
        --max-new-tokens 16
    PYTHONPATH=. python benchmarks/bench_serving.py --workload shared-prefix --rounds 3 \
        --systems engine,engine-nocache,vllm,vllm-nocache --vllm-python ~/vllm-cpu/bin/python
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"engine": "fastdecode.Engine", "engine-nocache": "fastdecode.Engine, prefix cache off",
          "vllm": "vLLM (CPU build)", "vllm-nocache": "vLLM (CPU build), prefix cache off",
          "hf": "transformers generate_batch", "ct2": "CTranslate2 generate_batch"}
BASELINES = ("engine-nocache", "vllm", "vllm-nocache", "hf", "ct2")


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                      tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def workload(args, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(args.seed)
    # Ids avoid the special tokens so no system treats a prompt token specially.
    if args.workload == "shared-prefix":
        system = rng.integers(3, vocab, size=args.system_len).tolist()
        return [system + rng.integers(3, vocab, size=int(n)).tolist()
                for n in rng.integers(16, 65, size=args.num_requests)]
    lengths = rng.integers(16, 513, size=args.num_requests)
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


def run_engine(model, prompts, args, prefix_caching: bool = True) -> dict:
    from fastdecode import Engine, SamplingParams
    engine = Engine(model, block_size=args.block_size, num_blocks=args.num_blocks,
                    max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                    enable_prefix_caching=prefix_caching)
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
    res["prefix_cache_hit_rate"] = engine.stats["prefix_cache_hit_rate"]
    return res


def run_vllm(model, prompts, args, prefix_caching: bool = True) -> dict:
    """vLLM's engine in its own environment and process (see ``vllm_baseline.py``)."""
    if not args.vllm_python or not os.path.exists(args.vllm_python):
        raise RuntimeError(f"no vLLM environment: --vllm-python {args.vllm_python!r} does not "
                           "exist")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        job = {"model_dir": tmp, "prompts": prompts, "max_new_tokens": args.max_new_tokens,
               "threads": args.threads, "prefix_caching": prefix_caching,
               "max_num_seqs": args.max_num_seqs,
               "max_batch_tokens": args.max_batch_tokens,
               "max_model_len": model.config.max_position_embeddings}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([args.vllm_python, str(Path(__file__).parent / "vllm_baseline.py")],
                              input=json.dumps(job), capture_output=True, text=True, env=env,
                              timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM failed: {done.stderr.strip()[-1500:]}")
    mark = "vllm_baseline result: "
    line = next((x for x in done.stdout.splitlines() if x.startswith(mark)), None)
    if line is None:
        raise RuntimeError(f"vLLM printed no result: {done.stderr.strip()[-1500:]}")
    out = json.loads(line[len(mark):])
    res = summarize(out["t0"], out["t_end"], out["token_times"])
    res["vllm"] = out["version"]
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


def ratio(runs: dict, name: str, base: str) -> str:
    """fastdecode's speed over ``base``: the median of per-round ratios when both ran in the
    same alternated rounds, else the ratio of the two runs."""
    a, b = runs[name], runs[base]
    pairs = list(zip(a.get("round_tokens_per_s", []), b.get("round_tokens_per_s", [])))
    if pairs and a["env"]["command"] == b["env"]["command"]:
        return f"{statistics.median(x / y for x, y in pairs):.2f}x"
    return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"


def report(raw: dict, key: str, stem: str) -> None:
    runs = raw[key]
    rows = []
    for name in (n for n in LABELS if n in runs):
        r = runs[name]
        rows.append({"system": LABELS[name], "tokens/s": r["tokens_per_s"],
                     "total s": r["seconds"], "TTFT p50 s": r["ttft_p50_s"],
                     "TTFT p99 s": r["ttft_p99_s"], "ITL ms": r["itl_mean_ms"],
                     "rounds tokens/s": " / ".join(f"{x:.1f}" for x in
                                                   r.get("round_tokens_per_s", [])) or "-",
                     **{f"vs {LABELS[b]}": ratio(runs, name, b) if b in runs else "-"
                        for b in BASELINES if b in runs}})
    table = markdown_table(rows)
    lines = ["# Serving benchmark", "", f"Workload: {key}.", "", table, "",
             "Generated tokens only; TTFT from submission (every request is submitted at t=0); "
             "ITL = mean gap between consecutive tokens of a request. With several rounds "
             "(systems alternated in each), each system's row is its median round and a ratio "
             "is the median of the per-round ratios. The machine may be shared with other "
             "jobs: each run records the load average it ran beside; systems measured at "
             "different times under different load compare only roughly. Each system's run:",
             ""]
    lines += [f"- {LABELS[name]}: " + "; ".join(f"{k}: {v}" for k, v in runs[name]["env"].items())
              for name in LABELS if name in runs]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    with (RESULTS / f"{stem}.csv").open("w", newline="") as f:
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
        ax.barh(names, [r[field] for r in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(title, fontsize=9)
    fig.suptitle(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=("random", "shared-prefix"), default="random")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--system-len", type=int, default=512,
                    help="shared-prefix: tokens of the shared system prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="engine,hf,ct2",
                    help=f"comma-separated subset of {', '.join(LABELS)}")
    ap.add_argument("--skip-baselines", action="store_true", help="same as --systems engine")
    ap.add_argument("--rounds", type=int, default=1, help="alternated rounds of all systems")
    ap.add_argument("--stem", default=None,
                    help="result file names under results/ (default: serving, or "
                         "serving_shared_prefix for that workload)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the table, CSV and plot of this workload from serving_raw.json")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="CPU threads of every system (torch intra-op, CTranslate2 intra, vLLM)")
    ap.add_argument("--vllm-python", default=os.environ.get("FASTDECODE_VLLM_PYTHON"),
                    help="the python of vLLM's own environment")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    systems = ["engine"] if args.skip_baselines else args.systems.split(",")
    model = build_model(args.seed)
    prompts = workload(args, model.config.vocab_size)
    shape = (f"shared system prompt of {args.system_len} + 16-64 distinct"
             if args.workload == "shared-prefix" else "prompts 16-512")
    key = (f"{args.num_requests} requests, {shape} (sum {sum(map(len, prompts))}), "
           f"{args.max_new_tokens} new tokens, seed {args.seed}, block {args.block_size}, "
           f"{args.num_blocks} blocks, {args.max_batch_tokens} batch tokens, "
           f"{args.max_num_seqs} max seqs, {args.threads} threads")
    RESULTS.mkdir(exist_ok=True)
    raw_path = RESULTS / "serving_raw.json"
    runners = {"engine": run_engine, "hf": run_hf, "ct2": run_ct2, "vllm": run_vllm,
               "engine-nocache": lambda *a: run_engine(*a, prefix_caching=False),
               "vllm-nocache": lambda *a: run_vllm(*a, prefix_caching=False)}
    stem = args.stem or ("serving" if args.workload == "random" else "serving_shared_prefix")
    if args.report_only:
        report(json.loads(raw_path.read_text()), key, stem)
        return
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name in [n for n in systems if n in rounds]:
            try:
                with torch.no_grad():
                    res = runners[name](model, prompts, args)
            except RuntimeError as exc:  # e.g. no vLLM here: the other systems go on
                print(f"{LABELS[name]}: not measured: {exc}", flush=True)
                del rounds[name]
                continue
            print(f"round {r}, {LABELS[name]}: {json.dumps(res)}", flush=True)
            rounds[name].append(res)
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    for name, results in rounds.items():
        res = sorted(results, key=lambda x: x["tokens_per_s"])[len(results) // 2]
        res["round_tokens_per_s"] = [x["tokens_per_s"] for x in results]
        res["env"] = environment()
        raw.setdefault(key, {})[name] = res
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    report(raw, key, stem)


if __name__ == "__main__":
    main()
