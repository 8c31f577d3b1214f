"""Bounded memory: an Engine serving 1,000 requests of varied lengths levels off.

Every batch size the scheduler forms reaches the fast-linear path: a product that kept state per
row count would grow with them (oneDNN, used there before the streaming kernel, caches a compiled
kernel of ~0.6 MiB per distinct shape: the process grew by ~500 MiB over this workload). Run in a
fresh interpreter, so that shapes cached by other tests do not hide growth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdecode.hf import transform

WORKLOAD = textwrap.dedent("""
    import json, random, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_engine import VOCAB, tiny_llama
    from fastdecode import Engine, SamplingParams
    from fastdecode.hf import runner
    runner._FAST_LINEAR_MIN_WEIGHTS = 0  # the packed path (what this bounds) for a tiny model

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    torch.set_num_threads(1)
    rng = random.Random(0)
    engine = Engine(tiny_llama(0, max_position_embeddings=512), num_blocks=512, max_num_seqs=32,
                    max_batch_tokens=512)
    done = submitted = 0
    rss = {{}}
    while done < 1000:
        burst = rng.randint(1, 24) if rng.random() < 0.1 else 0  # arrivals come in bursts
        for _ in range(min(burst, 1000 - submitted)):
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 200))]
            engine.add_request(prompt, SamplingParams(max_new_tokens=rng.randint(1, 24),
                                                      ignore_eos=True))
            submitted += 1
        for out in engine.step():
            done += out.finished
            if out.finished and done in (100, 1000):
                rss[done] = rss_mib()
    print(json.dumps(rss))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_rss_levels_off_over_1000_requests():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", WORKLOAD.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    growth = rss["1000"] - rss["100"]
    assert growth < 32, f"RSS grew {growth:.1f} MiB after the first 100 requests ({rss})"


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 31, 64, 65, 200])
def test_fast_linears_are_exact_at_every_row_count(rows):
    """The streaming product (up to 64 rows) and the nn.Linear fallback beyond both give the
    float32 product (the fused q/k/v with bias included): within twice plain float32's error of
    float64."""
    from tiny import tiny_model

    model = tiny_model("qwen2")
    attn = model.model.layers[0].self_attn
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    x = torch.randn(1, rows, attn.o_proj.in_features)
    with torch.no_grad():
        plain = [m(x) for m in linears]
        with transform.LinearLayout(model).active():
            fast = [m(x) for m in linears]
    for m, got, ref32 in zip(linears, fast, plain):
        bias = None if m.bias is None else m.bias.double()
        ref = torch.nn.functional.linear(x.double(), m.weight.double(), bias)
        assert got.shape == ref.shape
        tol = 2 * (ref32.double() - ref).abs().max().item() + 1e-6
        assert (got.double() - ref).abs().max().item() <= tol
