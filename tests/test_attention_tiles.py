"""The CPU kernel's register tiles: a query row's output and log-sum-exp are bitwise the same
whether it is computed in a full row tile, in a remainder tile, or alone.

The CPU kernel computes several query rows of a kv head per register tile (scores and P @ V).
Here a work item's rows are not a multiple of the tile (GQA 7 and 3, a last query chunk of one
token), and every row is compared with a one-row call: the same token as the only query of a
one-head decode call over that kv head's keys (copied into a one-head cache) at its causal
length.
"""

from __future__ import annotations

import pytest
import torch

import fastdecode.ops as ops
import fastdecode.ops._extension  # noqa: F401  (registers torch.ops.fastdecode.*)
from paged_cases import make_case

pytestmark = pytest.mark.skipif(not ops.is_available("cpu"), reason="cpu backend not built")


def alibi(num_qo_heads: int) -> torch.Tensor:
    return 2.0 ** (-8.0 * torch.arange(1, num_qo_heads + 1) / num_qo_heads)


@pytest.mark.parametrize("heads,head_dim,dtype,feature", [
    ((14, 2), 80, torch.float32, "softcap+alibi+window"),
    ((9, 3), 64, torch.bfloat16, "plain"),
    ((7, 1), 37, torch.float16, "lse"),
])
def test_rows_match_one_row_calls(heads, head_dim, dtype, feature):
    hq, hkv = heads
    group = hq // hkv
    seq_lens, q_lens = [150, 40], [37, 1]  # 37 tokens: chunks end in a one-token remainder
    case = make_case(seq_lens, q_lens=q_lens, num_qo_heads=hq, num_kv_heads=hkv,
                     head_dim=head_dim, block_size=16, dtype=dtype)
    kw = {}
    if feature == "softcap+alibi+window":
        kw = dict(softcap=5.0, sliding_window=70, alibi_slopes=alibi(hq))
    scale = head_dim ** -0.5

    def attend(query, k, v, tables, lens, cu, **extra):
        """(out, lse or None): the lse op where the case checks it, else paged_attention."""
        if feature != "lse":
            return ops.paged_attention(query, k, v, tables, lens, cu_seqlens_q=cu,
                                       backend="cpu", **extra), None
        out = torch.empty_like(query)
        lse = torch.empty(query.shape[:2])
        torch.ops.fastdecode.paged_attention_lse(out, lse, query, k, v, tables, lens, cu,
                                                 scale, True, 0.0)
        return out, lse

    out, lse = attend(case.query, case.k_cache, case.v_cache, case.block_tables,
                      case.seq_lens, case.cu_seqlens_q, **kw)
    for j in range(hkv):
        k1, v1 = (c[:, :, j:j + 1].contiguous() for c in (case.k_cache, case.v_cache))
        for h in range(j * group, (j + 1) * group):
            extra = dict(kw, alibi_slopes=kw["alibi_slopes"][h:h + 1]) if kw else {}
            for t in range(case.query.shape[0]):
                b = int((case.cu_seqlens_q[1:] <= t).sum())
                pos = seq_lens[b] - q_lens[b] + (t - int(case.cu_seqlens_q[b]))
                one, one_lse = attend(case.query[t:t + 1, h:h + 1], k1, v1,
                                      case.block_tables[b:b + 1],
                                      torch.tensor([pos + 1], dtype=torch.int32), None, **extra)
                assert torch.equal(one[0, 0], out[t, h]), f"token {t} head {h}"
                if lse is not None:
                    assert torch.equal(one_lse[0, 0], lse[t, h]), f"lse of token {t} head {h}"
