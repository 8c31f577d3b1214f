"""The plain-PyTorch backend: the readable statement of every op, always available.

Backend interface (every backend module implements the ops it covers with these signatures;
arguments arrive validated and normalised by :mod:`fastdecode.ops`):

- ``append_kv(key, value, k_cache, v_cache, slot_mapping) -> None``
- ``paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, *, scale:
  float, causal: bool, softcap: float (0 = off), sliding_window: int (0 = off), alibi_slopes:
  [Hq] float32 | None, relative_bias: [Hq, 2R + 1] float32 | None, workspace) -> None``
  (writes ``out``)

Values arrive unchecked from the ``*_unchecked`` ops (and from CUDA calls outside the debug
mode): a backend must then never access memory outside a tensor, and follows the contract in
:mod:`fastdecode.ops.attention` (bad slots skipped, a bad sequence's rows NaN).
- ``process_logits(logits, params: SamplingTensors) -> [B, V] float32``
- ``sample(logits, params, seeds [B] int64 >= 0, offsets [B] int64) -> [B] int64``
- ``apply_repetition_penalty(logits, seen_tokens | None, penalty [B] float32) -> [B, V] float32``
- ``contrastive_logits(expert, amateur, alpha [B] float32, plausibility [B] float32) -> [B, V]
  float32`` (expert, amateur: [B, V] contiguous, float32 / float16 / bfloat16)

Draws use one uniform per row from Philox4x32-10 keyed by the row's seed (key = seed low / high
32 bits, counter = offset low / high 32 bits, 0, 0; u = (x0 >> 8) * 2**-24), and pick the first
token in vocabulary order whose running probability sum exceeds ``u`` times the total.
"""

from __future__ import annotations

import torch

from fastdecode.ops._params import SamplingTensors

_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- KV cache + attention
def append_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    n, p = k_cache.shape[:2]
    keep = (slot_mapping >= 0) & (slot_mapping < n * p)  # unchecked callers: skip, never wrap
    slots = slot_mapping[keep]
    k_cache[slots // p, slots % p] = key[keep]
    v_cache[slots // p, slots % p] = value[keep]


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, *,
                    scale, causal, softcap, sliding_window, alibi_slopes, relative_bias=None,
                    workspace=None) -> None:
    n, p, hkv = k_cache.shape[:3]
    group = query.shape[1] // hkv
    # Rows of a sequence with bad values (possible in unchecked calls) stay NaN, and so do rows
    # no sequence owns: no row is left uninitialised, no id wraps around as a negative index.
    out.fill_(float("nan"))
    lens = seq_lens.tolist()
    starts = list(range(len(lens) + 1)) if cu_seqlens_q is None else cu_seqlens_q.tolist()
    for b, kv_len in enumerate(lens):
        first, end = starts[b], starts[b + 1]
        if not (0 <= first <= end <= query.shape[0] and 0 <= kv_len <= block_tables.shape[1] * p
                and (end - first <= kv_len or kv_len == 0 or not causal)):
            continue
        q = query[first:end].float()  # [Sq, Hq, D]
        if kv_len == 0:
            out[first:end] = 0
            continue
        blocks = block_tables[b, : (kv_len + p - 1) // p].long()
        if bool(((blocks < 0) | (blocks >= n)).any()):
            continue
        k = k_cache[blocks].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        q_pos = torch.arange(kv_len - q.shape[0], kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        if alibi_slopes is not None:
            logits = logits + alibi_slopes[:, None, None] * (k_pos - q_pos)
        if relative_bias is not None:
            radius = relative_bias.shape[1] // 2
            logits = logits + relative_bias[:, (k_pos - q_pos).clamp(-radius, radius) + radius]
        visible = torch.ones_like(logits[0], dtype=torch.bool)
        if causal:
            visible &= k_pos <= q_pos
        if sliding_window:
            visible &= k_pos > q_pos - sliding_window
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        out[first:end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)


# --------------------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits, seen_tokens, penalty) -> torch.Tensor:
    scores = logits.float().clone()
    if seen_tokens is None or seen_tokens.numel() == 0:
        return scores
    seen = torch.zeros_like(scores, dtype=torch.int32)
    seen.scatter_add_(1, seen_tokens.clamp(min=0), (seen_tokens >= 0).int())
    pen = penalty[:, None]
    penalised = torch.where(scores < 0, scores * pen, scores / pen)
    return torch.where(seen > 0, penalised, scores)


def process_logits(logits, params: SamplingTensors) -> torch.Tensor:
    scores = apply_repetition_penalty(logits, params.seen_tokens, params.repetition_penalty)
    sampled = params.temperature > 0
    warped = scores / torch.where(sampled, params.temperature, 1.0)[:, None]
    warped = _top_k(warped, params.top_k)
    warped = _top_p(warped, params.top_p)
    warped = _min_p(warped, params.min_p)
    return torch.where(sampled[:, None], warped, scores)


def _top_k(scores, top_k):
    """HF TopKLogitsWarper per row: keep every logit >= the k-th largest (ties kept)."""
    k_max = int(top_k.max()) if top_k.numel() else 0
    if k_max == 0:
        return scores
    kth = scores.topk(k_max, dim=-1).values.gather(1, (top_k.long() - 1).clamp(min=0)[:, None])
    remove = (scores < kth) & (top_k[:, None] > 0)
    return scores.masked_fill(remove, float("-inf"))


def _top_p(scores, top_p):
    """HF TopPLogitsWarper per row: ascending sort, drop where cumsum <= 1 - p, keep the last."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cum <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove & (top_p[:, None] < 1), float("-inf"))


def _min_p(scores, min_p):
    """HF MinPLogitsWarper per row: drop p < min_p * p_max (the argmax always stays)."""
    probs = scores.softmax(-1)
    remove = probs < min_p[:, None] * probs.amax(-1, keepdim=True)
    return scores.masked_fill(remove, float("-inf"))


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32 x 32 -> 64-bit product of int64 tensors holding uint32 values, without overflow."""
    t1 = a * (b & 0xFFFF)
    t2 = a * (b >> 16)
    s = ((t2 & 0xFFFF) << 16) + t1
    return (t2 >> 16) + (s >> 32), s & _MASK32


def philox_uniform(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 first output as a float in [0, 1); seeds, offsets: [B] int64 -> [B] float32."""
    k0, k1 = seeds & _MASK32, (seeds >> 32) & _MASK32
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return (c0 >> 8).float() * 2.0**-24


def sample(logits, params: SamplingTensors, seeds, offsets) -> torch.Tensor:
    raw = logits.float()
    scores = process_logits(logits, params)
    greedy = params.temperature == 0
    top = scores.max(-1).values
    bad = raw.isnan().any(-1) | (top == float("-inf")) | (~greedy & (top == float("inf")))
    greedy_ids = scores.argmax(-1)
    probs = (scores - top[:, None]).exp().double()
    cdf = probs.cumsum(-1)
    target = philox_uniform(seeds, offsets).double() * cdf[:, -1]
    drawn = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    # Rounding can put the target past the last kept token: take the last token with mass.
    last_kept = (probs > 0).int().cumsum(-1).argmax(-1)
    drawn = torch.minimum(drawn, last_kept)
    ids = torch.where(greedy, greedy_ids, drawn)
    return torch.where(bad, -1, ids)


def contrastive_logits(expert, amateur, alpha, plausibility) -> torch.Tensor:
    """expert, amateur: [B, V] float; alpha, plausibility: [B] float32 -> [B, V] float32."""
    x_e, x_a = expert.float(), amateur.float()
    lse_e, lse_a = x_e.logsumexp(-1, keepdim=True), x_a.logsumexp(-1, keepdim=True)
    top = x_e.amax(-1, keepdim=True)
    # p_e >= plausibility * p_max, on logits (the normaliser cancels); log(0) = -inf keeps all.
    plausible = (x_e >= top + plausibility.log()[:, None]) & (x_e > float("-inf"))
    penalty = torch.where(alpha[:, None] > 0, alpha[:, None] * (x_a - lse_a), 0.0)
    scores = torch.where(plausible, (x_e - lse_e) - penalty, float("-inf"))
    bad = ~(lse_e.isfinite() & lse_a.isfinite())  # NaN, +inf or nothing finite in a row
    return scores.masked_fill(bad, float("nan"))
