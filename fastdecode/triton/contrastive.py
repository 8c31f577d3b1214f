"""Contrastive-decoding scores (:mod:`fastdecode.ops.contrastive`): one program per row, two
passes over the vocabulary.

Pass 1 keeps, per lane, a running maximum and a sum of exp(x - max) of both rows (the online
softmax normaliser) and reduces them once after the loop; pass 2 writes log p_e - alpha * log p_a
where the expert's logit clears max + log(plausibility), -inf elsewhere, NaN in a row whose
normaliser is not finite (a NaN or +inf logit, or nothing finite).

Shapes: expert, amateur [num_seqs, vocab_size] (float32 / float16 / bfloat16, unit stride along
the vocabulary); alpha, plausibility [num_seqs] float32; out [num_seqs, vocab_size] float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # vocabulary chunk per loop step


@triton.jit
def _log_normaliser(row_ptr, vocab, BLOCK: tl.constexpr):
    """(max, logsumexp) of one row in float32; logsumexp is NaN / +-inf for a bad row."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # A lane that has seen only -inf keeps the shift 0 (no -inf - -inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    top = tl.max(m, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(s * tl.exp(m - shift), 0)
    return top, shift + tl.log(total)


@triton.jit
def _contrastive_kernel(
    out_ptr, expert_ptr, amateur_ptr, alpha_ptr, plausibility_ptr,
    stride_eb, stride_ab, stride_ob,
    vocab,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    e_row = expert_ptr + row * stride_eb
    a_row = amateur_ptr + row * stride_ab
    o_row = out_ptr + row * stride_ob
    top, lse_e = _log_normaliser(e_row, vocab, BLOCK)
    _, lse_a = _log_normaliser(a_row, vocab, BLOCK)
    bad = (tl.abs(lse_e) == float("inf")) | (lse_e != lse_e) | (tl.abs(lse_a) == float("inf")) \
        | (lse_a != lse_a)
    alpha = tl.load(alpha_ptr + row)
    threshold = top + tl.log(tl.load(plausibility_ptr + row))
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < vocab
        x_e = tl.load(e_row + offs, mask=ok, other=0.0).to(tl.float32)
        x_a = tl.load(a_row + offs, mask=ok, other=0.0).to(tl.float32)
        penalty = tl.where(alpha > 0, alpha * (x_a - lse_a), 0.0)
        plausible = (x_e >= threshold) & (x_e > float("-inf"))
        score = tl.where(plausible, (x_e - lse_e) - penalty, float("-inf"))
        tl.store(o_row + offs, tl.where(bad, float("nan"), score), mask=ok)


def contrastive_logits(expert: torch.Tensor, amateur: torch.Tensor, alpha: torch.Tensor,
                       plausibility: torch.Tensor) -> torch.Tensor:
    """See the module docstring for shapes; returns a new [num_seqs, vocab_size] float32."""
    batch, vocab = expert.shape
    out = torch.empty((batch, vocab), dtype=torch.float32, device=expert.device)
    if batch:
        _contrastive_kernel[(batch,)](
            out, expert, amateur, alpha, plausibility,
            expert.stride(0), amateur.stride(0), out.stride(0), vocab,
            BLOCK=BLOCK, num_warps=4,
        )
    return out
