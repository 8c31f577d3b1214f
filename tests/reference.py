"""Float64 references every backend is held to.

Deliberately naive and independent of ``fastdecode``: attention is a loop over sequences and
heads on gathered pages; sampling is a loop over rows that spells out Hugging Face's processors.
``upcast=False`` computes in the input dtype instead; the pass rule (flash-attention's) is that a
kernel's error against the float64 result is at most twice the error of that low-precision run,
plus a small absolute epsilon (see :func:`assert_close_2x`).
"""

from __future__ import annotations

import math

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """cache [N, P, Hkv, D], block_table [M] -> the sequence's first ``length`` tokens
    [length, Hkv, D]."""
    p = cache.shape[1]
    rows = [cache[int(block_table[i // p]), i % p] for i in range(length)]
    return torch.stack(rows) if rows else cache.new_zeros((0,) + cache.shape[2:])


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q=None, *,
                    scale=None, causal=True, softcap=None, sliding_window=None,
                    alibi_slopes=None, relative_bias=None, upcast=True) -> torch.Tensor:
    """query [B or T, Hq, D] -> out [B or T, Hq, D] (float64 if upcast, else query dtype).
    relative_bias [Hq, 2R + 1]: the bias of key j for query i is entry R + clamp(j - i, -R, R)."""
    dt = torch.float64 if upcast else query.dtype
    hq, d = query.shape[1], query.shape[2]
    hkv = k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    num_seqs = seq_lens.shape[0]
    starts = (list(range(num_seqs + 1)) if cu_seqlens_q is None
              else [int(x) for x in cu_seqlens_q])
    out = torch.zeros(query.shape, dtype=dt)
    for b in range(num_seqs):
        n = int(seq_lens[b])
        q = query[starts[b]:starts[b + 1]].to(dt)
        sq = q.shape[0]
        if n == 0 or sq == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], n).to(dt)
        v = gather_kv(v_cache, block_tables[b], n).to(dt)
        for h in range(hq):
            kv_h = h // (hq // hkv)
            s = (q[:, h] @ k[:, kv_h].T) * scale  # [Sq, n]
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            for i in range(sq):
                pos = n - sq + i
                for j in range(n):
                    if alibi_slopes is not None:
                        s[i, j] += float(alibi_slopes[h]) * (j - pos)
                    if relative_bias is not None:
                        radius = relative_bias.shape[1] // 2
                        s[i, j] += float(relative_bias[h, radius + min(max(j - pos, -radius),
                                                                       radius)])
                    hidden = (causal and j > pos) or (sliding_window and j <= pos - sliding_window)
                    if hidden:
                        s[i, j] = -math.inf
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            out[starts[b]:starts[b + 1], h] = p @ v[:, kv_h]
    return out


def process_row(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                repetition_penalty=1.0, seen=()) -> torch.Tensor:
    """One row [V] -> processed float64 scores [V] in HF order (penalty, temperature, top-k,
    top-p, min-p). temperature 0 = greedy: only the penalty. Ties at the top-k and top-p
    boundaries are all kept."""
    s = logits.to(torch.float64).clone()
    for tok in {int(t) for t in seen if int(t) >= 0}:
        s[tok] = s[tok] * repetition_penalty if s[tok] < 0 else s[tok] / repetition_penalty
    if temperature == 0:
        return s
    s = s / temperature
    v = s.numel()
    if 0 < top_k < v:
        kth = torch.sort(s, descending=True).values[top_k - 1]
        s[s < kth] = -math.inf
    if top_p < 1:
        # Keep a token iff the mass of the tokens strictly above it is < top_p: sorted
        # descending, that is the exclusive cumulative sum at the start of its tie group.
        probs, order = torch.sort(torch.softmax(s, 0), descending=True)
        _, group, counts = torch.unique_consecutive(probs, return_inverse=True,
                                                    return_counts=True)
        above = (torch.cumsum(probs, 0) - probs)[torch.cumsum(counts, 0) - counts][group]
        keep = torch.empty(v, dtype=torch.bool)
        keep[order] = above < top_p
        s[~keep] = -math.inf
    if min_p > 0:
        probs = torch.softmax(s, 0)
        s[probs < min_p * probs.max()] = -math.inf
    return s


def process_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   repetition_penalty=1.0, seen_tokens=None) -> torch.Tensor:
    """logits [B, V] -> processed float64 scores [B, V]; parameters numbers or [B] tensors."""
    rows = []
    for b in range(logits.shape[0]):
        def at(x, cast):
            return cast(x[b]) if isinstance(x, torch.Tensor) else cast(x)
        rows.append(process_row(
            logits[b], temperature=at(temperature, float), top_k=at(top_k, int),
            top_p=at(top_p, float), min_p=at(min_p, float),
            repetition_penalty=at(repetition_penalty, float),
            seen=() if seen_tokens is None else seen_tokens[b].tolist()))
    return torch.stack(rows)


def contrastive_logits(expert, amateur, alpha, plausibility,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Contrastive-decoding scores [B, V] in ``dtype``, row by row from the definition: log p_e -
    alpha * log p_a where log p_e >= log(plausibility) + max log p_e (and p_e > 0), else -inf;
    NaN rows where either model's logits hold a NaN or +inf or nothing finite. alpha,
    plausibility: numbers or [B] tensors."""
    rows = []
    for b in range(expert.shape[0]):
        a = float(alpha[b]) if isinstance(alpha, torch.Tensor) else float(alpha)
        p = float(plausibility[b]) if isinstance(plausibility, torch.Tensor) else plausibility
        x_e, x_a = expert[b].to(dtype), amateur[b].to(dtype)
        if not all(math.isfinite(float(x.logsumexp(0))) for x in (x_e, x_a)):
            rows.append(torch.full_like(x_e, math.nan))
            continue
        lp_e, lp_a = x_e.log_softmax(0), x_a.log_softmax(0)
        threshold = math.log(p) if p > 0 else -math.inf
        keep = (lp_e >= threshold + lp_e.max()) & (lp_e > -math.inf)
        score = lp_e - a * lp_a if a > 0 else lp_e
        rows.append(torch.where(keep, score, -math.inf))
    return torch.stack(rows)


def distribution(logits, **params) -> torch.Tensor:
    """The exact sampling distribution [B, V] float64 of the processed scores."""
    return torch.softmax(process_logits(logits, **params), dim=-1)


def assert_close_2x(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                    atol: float = 1e-5, name: str = "out") -> None:
    """flash-attention's rule: max|out - ref64| <= 2 * max|ref_lowp - ref64| + atol."""
    err = (out.to(torch.float64) - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp.to(torch.float64) - ref64).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + atol, f"{name}: max error {err:.3g} > 2 x {base:.3g} + {atol:g}"
