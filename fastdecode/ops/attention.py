"""Public attention ops: ``append_kv`` and ``paged_attention`` (validation + backend dispatch)."""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.ops import _backends

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError("k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape "
                         f"{tuple(k_cache.shape)}")
    if k_cache.dtype not in _FLOATS or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"k_cache / v_cache must share one of {_FLOATS}, got "
                        f"{k_cache.dtype} / {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if k_cache.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {k_cache.shape[-1]}")


def _index(name: str, t: torch.Tensor, dtype: torch.dtype, dims: int) -> torch.Tensor:
    if t.is_floating_point() or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D integer tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t.to(dtype).contiguous()


def append_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
              backend: str = "auto") -> None:
    """Write new keys/values into the paged cache, in place.

    key, value: [num_tokens, num_kv_heads, head_dim], the cache dtype (any strides).
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous.
    slot_mapping: [num_tokens] int64; token t goes to slot ``slot_mapping[t]`` = block * P + offset;
        a negative slot skips the token (padding).
    """
    _check_cache(k_cache, v_cache)
    n, p, hkv, d = k_cache.shape
    if key.dim() != 3 or key.shape[1:] != (hkv, d) or value.shape != key.shape:
        raise ValueError(f"key / value must be [num_tokens, {hkv}, {d}], got "
                         f"{tuple(key.shape)} / {tuple(value.shape)}")
    if key.dtype != k_cache.dtype or value.dtype != k_cache.dtype:
        raise TypeError(f"key / value dtype {key.dtype} / {value.dtype} != cache dtype "
                        f"{k_cache.dtype}")
    slot_mapping = _index("slot_mapping", slot_mapping, torch.int64, 1)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for "
                         f"{key.shape[0]} tokens")
    if key.shape[0] == 0:
        return
    impl = _backends.resolve(backend, "append_kv", k_cache.device)
    impl.append_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                    cu_seqlens_q: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    causal: bool = True, softcap: Optional[float] = None,
                    sliding_window: Optional[int] = None,
                    alibi_slopes: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention of queries over a paged KV cache.

    Decode form (``cu_seqlens_q`` None): query [num_seqs, num_qo_heads, head_dim], one token per
    sequence, the sequence's last KV position. Packed form: query [num_tokens, num_qo_heads,
    head_dim] with cu_seqlens_q [num_seqs + 1] int32; the query tokens of sequence b are its last
    ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` KV positions (bottom-right causal alignment).

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], keys already appended.
    block_tables: [num_seqs, max_blocks_per_seq] int32. seq_lens: [num_seqs] int32 KV lengths
    including the query tokens. scale: default head_dim ** -0.5. softcap: logits =
    softcap * tanh(logits / softcap), before masking. sliding_window w: a query at position i sees
    keys i - w < j <= i. alibi_slopes: [num_qo_heads] float32, bias slope * (j - i).
    Query head h reads kv head h // (num_qo_heads // num_kv_heads). Rows with seq_lens 0 give
    zeros. out: optional preallocated output, same shape/dtype as the result. workspace: optional
    scratch for split-KV backends (``workspace_size`` of the backend gives its size); the call
    then allocates nothing.

    Returns out: [num_seqs or num_tokens, num_qo_heads, head_dim], the query dtype.
    """
    _check_cache(k_cache, v_cache)
    n, p, hkv, d = k_cache.shape
    if query.dim() != 3 or query.shape[-1] != d:
        raise ValueError(f"query must be [tokens, num_qo_heads, {d}], got {tuple(query.shape)}")
    if query.dtype != k_cache.dtype:
        raise TypeError(f"query dtype {query.dtype} != cache dtype {k_cache.dtype}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    hq = query.shape[1]
    if hq % hkv:
        raise ValueError(f"num_qo_heads {hq} must be a multiple of num_kv_heads {hkv}")
    block_tables = _index("block_tables", block_tables, torch.int32, 2)
    seq_lens = _index("seq_lens", seq_lens, torch.int32, 1)
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} seqs")
    if cu_seqlens_q is None:
        if query.shape[0] != num_seqs:
            raise ValueError(f"decode form: query has {query.shape[0]} tokens for "
                             f"{num_seqs} sequences (pass cu_seqlens_q for the packed form)")
    else:
        cu_seqlens_q = _index("cu_seqlens_q", cu_seqlens_q, torch.int32, 1)
        if cu_seqlens_q.shape[0] != num_seqs + 1:
            raise ValueError(f"cu_seqlens_q must be [{num_seqs + 1}], got "
                             f"{tuple(cu_seqlens_q.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None  # HF uses None / non-positive for "no window"
    if alibi_slopes is not None:
        if alibi_slopes.shape != (hq,):
            raise ValueError(f"alibi_slopes must be [{hq}], got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.to(device=query.device, dtype=torch.float32).contiguous()
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.dtype != query.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(query.shape)} {query.dtype}")
    op = "paged_attention" if cu_seqlens_q is None else "paged_prefill"
    impl = _backends.resolve(backend, op, query.device, head_dim=d)
    impl.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out,
                         scale=float(d ** -0.5 if scale is None else scale), causal=bool(causal),
                         softcap=float(softcap or 0.0), sliding_window=int(sliding_window or 0),
                         alibi_slopes=alibi_slopes, workspace=workspace)
    return out
