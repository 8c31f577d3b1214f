"""paged_attention with ``causal=False`` as cross-attention: decoder queries over an encoder
sequence whose length differs from the decoder's (seq_lens = the encoder length, so the query
tokens are not the last KV positions). Every backend, against the float64 reference.

Without a sliding window or ALiBi, a non-causal query sees the whole sequence: its output must
not depend on where the bottom-right alignment puts it, so the packed form (many decoder tokens
per sequence, also more than the encoder has) must agree row for row with the decode form (one
token per sequence).
"""

from __future__ import annotations

import pytest
import torch

import fastdecode.ops as ops
from paged_cases import check_attention, make_case

PACKED = pytest.mark.ops("paged_prefill")


def _encoder_case(backend, enc_lens, dec_lens, dtype, block_size=16, hq=8, hkv=2, d=64):
    """Encoder KV of ``enc_lens`` tokens per sequence; ``dec_lens`` decoder query tokens each
    (None: decode form). Interpreted Triton halves the lengths (never below 1)."""
    if backend.interpreted:
        enc_lens = [max(1, n // 2) if n else 0 for n in enc_lens]
    return make_case(enc_lens, q_lens=dec_lens, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                     block_size=block_size, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_over_encoder(backend, dtype, block_size):
    """One decoder token per sequence over encoders of 1, P-1, P+1, 3P + 5 and 0 tokens."""
    p = block_size
    case = _encoder_case(backend, [1, max(p - 1, 2), p + 1, 3 * p + 5, 0], None, dtype, p)
    out = check_attention(backend, case, causal=False)
    assert (out[-1] == 0).all()  # an empty encoder gives zeros


@PACKED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_packed_over_encoder(backend, dtype, block_size):
    """Decoder prefills over encoders: more decoder tokens than encoder tokens (10 over 3),
    fewer (2 over 40), equal, one token, and tokens over an empty encoder (zeros)."""
    case = _encoder_case(backend, [3, 40, 7, 19, 0], [10, 2, 7, 1, 4], dtype, block_size)
    out = check_attention(backend, case, causal=False)
    assert (out[-4:] == 0).all()


@PACKED
@pytest.mark.parametrize("feature", [{"alibi": True}, {"sliding_window": 5}, {"softcap": 4.0}])
def test_packed_over_encoder_with_position_features(backend, feature):
    """Query positions may be negative (more decoder tokens than encoder tokens); ALiBi and the
    window keep their formulas there."""
    case = _encoder_case(backend, [3, 30, 9], [11, 4, 9], torch.float32, 4, hq=4, hkv=4)
    kwargs = dict(feature)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = 2.0 ** (-torch.arange(1, 5, dtype=torch.float32))
    check_attention(backend, case, causal=False, **kwargs)


@PACKED
def test_alignment_does_not_matter(backend):
    """Each packed decoder token gives what the decode form gives for it alone."""
    enc_lens, dec_lens = [5, 33, 17], [9, 3, 17]
    case = _encoder_case(backend, enc_lens, dec_lens, torch.float32).to(backend.device)
    packed = ops.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                                 case.seq_lens, cu_seqlens_q=case.cu_seqlens_q, causal=False,
                                 backend=backend.name)
    owner = torch.repeat_interleave(torch.arange(len(dec_lens)), torch.tensor(dec_lens))
    owner = owner.to(backend.device)
    decode = ops.paged_attention(case.query, case.k_cache, case.v_cache,
                                 case.block_tables[owner], case.seq_lens[owner], causal=False,
                                 backend=backend.name)
    torch.testing.assert_close(packed, decode, rtol=0, atol=1e-5)


def test_causal_packed_still_needs_its_kv_positions():
    """The relaxed rule is for causal=False only: a causal query needs its own KV position."""
    case = make_case([3], q_lens=[5], num_qo_heads=2, num_kv_heads=1, head_dim=16,
                     block_size=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="allowed only with causal=False"):
        ops.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                            case.seq_lens, cu_seqlens_q=case.cu_seqlens_q, backend="torch")
