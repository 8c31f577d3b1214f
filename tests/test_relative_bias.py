"""paged_attention's ``relative_bias`` (a learned bias per head and relative distance, T5's
bucketed relative position bias expanded per distance) on every backend, against the float64
reference; and the T5 construction of the table against the installed transformers' T5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Attention

import fastdecode.ops as ops
from fastdecode.ops import _backends
from paged_cases import check_attention, make_case
from pairwise import cases

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def t5_table(attention: T5Attention) -> torch.Tensor:
    """[Hq, 2R + 1], R = max_distance: the bias of distances -R .. R from the layer's own bucket
    function (every distance beyond R shares R's bucket, so the table is exact)."""
    r = attention.relative_attention_max_distance
    buckets = attention._relative_position_bucket(
        torch.arange(-r, r + 1), bidirectional=not attention.is_decoder,
        num_buckets=attention.relative_attention_num_buckets, max_distance=r)
    return attention.relative_attention_bias.weight[buckets].T.contiguous()


@pytest.mark.parametrize(*cases({"dtype": DTYPES, "heads": [(4, 4), (8, 2), (6, 1)],
                                 "radius": [0, 3, 40], "block_size": [1, 16],
                                 "packed": [pytest.param(False, marks=pytest.mark.ops(
                                     "paged_relative_bias")),
                                            pytest.param(True, marks=pytest.mark.ops(
                                                "paged_prefill"))],
                                 "extra": ["none", "alibi", "softcap", "window"]}, seed=3))
def test_relative_bias_matches_reference(backend, dtype, heads, radius, block_size, packed,
                                         extra):
    """Radius 0 (one bias per head), 3 (most distances saturate) and 40 (past some sequences'
    lengths), decode and packed, alone and with the other logit terms."""
    hq, hkv = heads
    lens, q_lens = [1, 17, 50, 0], ([1, 5, 12, 0] if packed else None)
    if backend.interpreted:
        lens = [1, 9, 26, 0]
        q_lens = [1, 3, 7, 0] if packed else None
    d = 96
    case = make_case(lens, q_lens=q_lens, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                     block_size=block_size, dtype=dtype)
    kwargs = {"relative_bias": torch.randn(hq, 2 * radius + 1)}
    if extra == "alibi":
        kwargs["alibi_slopes"] = 2.0 ** (-torch.arange(1, hq + 1, dtype=torch.float32))
    elif extra == "softcap":
        kwargs["softcap"] = 5.0
    elif extra == "window":
        kwargs["sliding_window"] = 6
    check_attention(backend, case, **kwargs)


@pytest.mark.ops("paged_prefill")
def test_relative_bias_without_causality(backend):
    """A bidirectional (encoder-style) table: keys after the query get their own entries."""
    case = make_case([23, 9], q_lens=[23, 9], num_qo_heads=4, num_kv_heads=2, head_dim=64,
                     block_size=8, dtype=torch.float32)
    check_attention(backend, case, causal=False, relative_bias=torch.randn(4, 2 * 6 + 1))


@pytest.mark.parametrize("decoder", [True, False])
def test_t5_table_reproduces_compute_bias(decoder):
    """Entry R + clamp(j - i, -R, R) of the table equals T5's compute_bias for every (i, j) up to
    three times the max distance, for the decoder's unidirectional and the encoder's
    bidirectional buckets."""
    config = T5Config(d_model=32, d_kv=8, num_heads=4, is_decoder=decoder,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128)
    layer = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    torch.nn.init.normal_(layer.relative_attention_bias.weight)
    n = 3 * config.relative_attention_max_distance
    with torch.no_grad():
        expected = layer.compute_bias(n, n)[0]  # [H, n, n]
        table = t5_table(layer)
    r = table.shape[1] // 2
    rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).clamp(-r, r) + r
    assert torch.equal(table[:, rel], expected)


@pytest.mark.ops("paged_relative_bias")
def test_t5_decoder_self_attention_layer(backend):
    """A random T5 decoder self-attention layer (its own forward: projections, compute_bias, the
    causal mask, its attention function) against the layer's projections around the packed op
    over a paged cache with the table and scale 1 (T5 does not scale its logits). The last row
    is also run as a decode step, at a length past max_distance."""
    config = T5Config(d_model=64, d_kv=32, num_heads=4, is_decoder=True,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20)
    layer = T5Attention(config, has_relative_attention_bias=True, layer_idx=0).eval()
    torch.nn.init.normal_(layer.relative_attention_bias.weight)
    n, h, d, p = 37, config.num_heads, config.d_kv, 4
    hidden = torch.randn(1, n, config.d_model)
    with torch.no_grad():
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        expected = layer(hidden, mask)[0][0]  # [n, d_model]
        q, k, v = (proj(hidden)[0].view(n, h, d) for proj in (layer.q, layer.k, layer.v))
        table = t5_table(layer)
    case = make_case([n], q_lens=[n], num_qo_heads=h, num_kv_heads=h, head_dim=d,
                     block_size=p, dtype=torch.float32)
    blocks = case.block_tables[0, torch.arange(n) // p].long()
    case.k_cache[blocks, torch.arange(n) % p] = k
    case.v_cache[blocks, torch.arange(n) % p] = v
    dev = case.to(backend.device)

    def attend(query, **kw):
        out = ops.paged_attention(query.to(backend.device), dev.k_cache, dev.v_cache,
                                  dev.block_tables, dev.seq_lens, scale=1.0,
                                  relative_bias=table.to(backend.device), backend=backend.name,
                                  **kw)
        with torch.no_grad():
            return layer.o(out.cpu().flatten(1))

    if backend.covers("paged_prefill"):
        got = attend(q, cu_seqlens_q=dev.cu_seqlens_q)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attend(q[-1:])[0], expected[-1], rtol=1e-4, atol=1e-5)


def test_auto_runs_relative_bias_where_it_is_implemented(monkeypatch):
    """The CUDA kernel has no relative_bias: auto on a CUDA device trusted for the plain decode
    form still sends a decode call with a table to Triton."""
    monkeypatch.setattr(_backends, "is_available", lambda name: True)
    monkeypatch.setattr(_backends, "_load", lambda name: type("M", (), {"name": name})())
    monkeypatch.setenv("FASTDECODE_AUTO_CUDA", "1")
    cuda = torch.device("cuda")
    assert _backends.resolve("auto", "paged_attention", cuda).name == "cuda"
    assert _backends.resolve("auto", "paged_relative_bias", cuda).name == "triton"


def test_cuda_backend_refuses_relative_bias():
    case = make_case([5], num_qo_heads=2, num_kv_heads=2, head_dim=64, block_size=4,
                     dtype=torch.float32)
    with pytest.raises(ops.BackendUnavailableError, match="relative_bias"):
        ops.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                            case.seq_lens, relative_bias=torch.zeros(2, 3), backend="cuda")
