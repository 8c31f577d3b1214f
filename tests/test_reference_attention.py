"""The float64 reference itself, against torch's scaled_dot_product_attention on contiguous KV
with masks built here independently (softcap, which SDPA lacks, is computed by hand)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import reference


def paged_copy(k: torch.Tensor, v: torch.Tensor, block_size: int):
    """Contiguous k, v [n, Hkv, D] -> (k_cache, v_cache [N, P, Hkv, D], block_table [1, M])
    with the sequence's blocks in shuffled order among spare ones."""
    n = k.shape[0]
    m = math.ceil(n / block_size)
    num_blocks = m + 2
    table = torch.randperm(num_blocks)[:m]
    caches = []
    for x in (k, v):
        cache = torch.randn(num_blocks, block_size, *x.shape[1:], dtype=x.dtype)
        padded = torch.cat([x, x.new_zeros(m * block_size - n, *x.shape[1:])])
        cache[table] = padded.view(m, block_size, *x.shape[1:])
        caches.append(cache)
    return caches[0], caches[1], table.view(1, m).to(torch.int32)


def visible(sq: int, n: int, causal: bool, window) -> torch.Tensor:
    """[sq, n] bool: query i sits at KV position n - sq + i (bottom-right)."""
    pos = torch.arange(n - sq, n)[:, None]
    key = torch.arange(n)[None, :]
    mask = torch.ones(sq, n, dtype=torch.bool)
    if causal:
        mask &= key <= pos
    if window:
        mask &= key > pos - window
    return mask


CASES = {
    "decode": dict(sq=1, n=37),
    "prefill": dict(sq=20, n=20),
    "chunked_prefill": dict(sq=7, n=30),
    "non_causal": dict(sq=7, n=30, causal=False),
    "window": dict(sq=9, n=30, window=5),
    "window_1": dict(sq=4, n=11, window=1),
    "window_non_causal": dict(sq=6, n=20, window=4, causal=False),
    "alibi": dict(sq=5, n=23, alibi=True),
    "softcap": dict(sq=6, n=19, softcap=1.5),
    "softcap_window_alibi": dict(sq=6, n=25, softcap=2.0, window=8, alibi=True),
    "mqa": dict(sq=3, n=17, hkv=1),
    "gqa_7": dict(sq=3, n=17, hq=14, hkv=2),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_size", [1, 5])
def test_reference_matches_sdpa(name, block_size):
    c = dict(hq=8, hkv=2, d=16, causal=True, window=None, alibi=False, softcap=None)
    c.update(CASES[name])
    sq, n, hq, hkv, d = c["sq"], c["n"], c["hq"], c["hkv"], c["d"]
    q = torch.randn(sq, hq, d, dtype=torch.float64)
    k = torch.randn(n, hkv, d, dtype=torch.float64)
    v = torch.randn(n, hkv, d, dtype=torch.float64)
    slopes = torch.rand(hq) if c["alibi"] else None
    k_cache, v_cache, table = paged_copy(k, v, block_size)
    got = reference.paged_attention(
        q, k_cache, v_cache, table, torch.tensor([n], dtype=torch.int32),
        torch.tensor([0, sq], dtype=torch.int32), causal=c["causal"], softcap=c["softcap"],
        sliding_window=c["window"], alibi_slopes=slopes)

    qh = q.transpose(0, 1)  # [Hq, sq, D]
    kh = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, n, D]
    vh = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    mask = visible(sq, n, c["causal"], c["window"])
    bias = torch.zeros(hq, sq, n, dtype=torch.float64)
    if slopes is not None:
        dist = torch.arange(n)[None, :] - torch.arange(n - sq, n)[:, None]
        bias = slopes.double()[:, None, None] * dist
    if c["softcap"]:
        cap = c["softcap"]
        logits = cap * torch.tanh((qh @ kh.transpose(1, 2)) * d ** -0.5 / cap) + bias
        want = logits.masked_fill(~mask, -math.inf).softmax(-1) @ vh
    else:
        float_mask = bias.masked_fill(~mask, -math.inf)
        want = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=float_mask)
    torch.testing.assert_close(got, want.transpose(0, 1), atol=1e-12, rtol=1e-10)


def test_reference_empty_and_fully_masked_rows():
    """seq_lens 0 -> zeros; a query position before every key (seq_lens < q tokens) -> zeros."""
    k_cache = torch.randn(3, 4, 1, 8)
    table = torch.tensor([[2, 0], [1, 0]], dtype=torch.int32)
    q = torch.randn(4, 2, 8)
    out = reference.paged_attention(q, k_cache, k_cache, table,
                                    torch.tensor([0, 2], dtype=torch.int32),
                                    torch.tensor([0, 1, 4], dtype=torch.int32))
    assert (out[0] == 0).all() and (out[1] == 0).all()
    assert out[2:].abs().sum() > 0
