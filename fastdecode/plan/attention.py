"""Every layer's paged KV cache and the attention call each layer makes in a step.

:class:`PagedKVCache` resolves the ops backends once (at construction) and calls their run
functions directly: a layer's call costs the kernels plus a tuple comparison. The public ops'
argument checks run once per layer (its first call, and again whenever that layer's argument
signature changes), not per step; the ids a plan carries were built by
:class:`~fastdecode.plan.step.StepPlanner` and are trusted like the ``*_unchecked`` ops trust
theirs (:mod:`fastdecode.ops.attention` says what a bad id then does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from fastdecode.ops import _backends
from fastdecode.ops._attention_checks import append_kv_args, paged_attention_args
from fastdecode.ops.memory import allocate_kv_cache
from fastdecode.plan.cascade import attend_shared_prefix

if TYPE_CHECKING:
    from fastdecode.plan.step import StepPlan

_INT32_MAX = 2**31 - 1


class PagedKVCache:
    """Per layer ``k_caches[i]``, ``v_caches[i]``: [N, P, Hkv, D] (zero-initialised).

    num_qo_heads Hq sizes the split-KV workspace; dtype: the caches' dtype; backend: the ops
    backend of every call ("auto": see :func:`fastdecode.ops._backends.resolve`). ``version``
    changes whenever the pools or the workspace are reallocated (a captured graph holding
    their addresses is then stale). ``calls`` counts attention calls (outside torch.compile).
    """

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, num_qo_heads: int, dtype: torch.dtype, device,
                 backend: str = "auto") -> None:
        self.num_layers, self.block_size = num_layers, block_size
        self.num_kv_heads, self.head_dim, self.num_qo_heads = num_kv_heads, head_dim, num_qo_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.num_blocks = num_blocks
        pools = [self._allocate(num_blocks) for _ in range(num_layers)]
        self.k_caches = [k for k, _ in pools]
        self.v_caches = [v for _, v in pools]
        self._append = _backends.resolve(backend, "append_kv", self.device)
        self._decode = _backends.resolve(backend, "paged_attention", self.device, head_dim)
        self._prefill = _backends.resolve(backend, "paged_prefill", self.device, head_dim)
        self._backend = backend
        # Shared-prefix decode runs on the CPU extension's kernels (fastdecode.plan.cascade).
        self.shared_prefix_decode = self._decode.__name__ == "fastdecode.ops.cpu_backend"
        self._decode_with_bias = None
        self._workspace_size = getattr(self._decode, "workspace_size", None)
        self._workspace: Optional[torch.Tensor] = None
        self._checked: dict[int, tuple] = {}  # layer -> (signature, normalised scalars)
        self.calls = 0
        self.version = 0

    def _allocate(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        return allocate_kv_cache(num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
                                 dtype=self.dtype, device=self.device)

    def grow(self, num_blocks: int) -> None:
        """Enlarge every pool to ``num_blocks`` blocks, keeping blocks ``0 .. num_blocks - 1``
        (ids and contents). The pools are new tensors afterwards."""
        if num_blocks <= self.num_blocks:
            return
        for layer in range(self.num_layers):
            k, v = self._allocate(num_blocks)
            k[:self.num_blocks].copy_(self.k_caches[layer])
            v[:self.num_blocks].copy_(self.v_caches[layer])
            self.k_caches[layer], self.v_caches[layer] = k, v
        self.num_blocks = num_blocks
        self.version += 1

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply copy-on-write ``(src, dst)`` block copies to every layer's K and V pool."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies]).to(self.device, non_blocking=True)
        dst = torch.tensor([c[1] for c in copies]).to(self.device, non_blocking=True)
        for cache in (*self.k_caches, *self.v_caches):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def workspace(self, num_seqs: int, width: int) -> Optional[torch.Tensor]:
        """Scratch of the decode kernel for ``num_seqs`` sequences with ``width``-column block
        tables, shared by every layer of a step (None when the backend needs none). A view of
        one buffer that grows, never shrinks: a static step keeps its address."""
        if self._workspace_size is None:
            return None
        need = self._workspace_size(num_seqs, self.num_qo_heads, self.head_dim, width,
                                    self.block_size)
        if not need:
            return None
        if self._workspace is None or self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.float32, device=self.device)
            self.version += 1
        return self._workspace[:need]

    def attend(self, plan: "StepPlan", layer: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, *, scale: float, softcap: Optional[float],
               sliding_window: Optional[int],
               relative_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One layer: append its keys / values at the plan's slots, then attend.

        query: [T, Hq, D]; key, value: [T, Hkv, D] (any strides with a unit last one; converted
        to the cache dtype if needed) -> [T, Hq, D] in the query's dtype. relative_bias:
        [Hq, 2R + 1] float32 (T5's bias per distance, see ``paged_attention``) or None.
        """
        dtype = query.dtype
        if dtype != self.dtype:  # a cache in another dtype than the model (kv_dtype)
            query, key, value = (t.to(self.dtype) for t in (query, key, value))
        meta = plan.attn
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if scale is None:
            scale = self.head_dim ** -0.5
        if torch.compiler.is_compiling():
            scalars = _scalars(scale, softcap, sliding_window)  # checked by the eager steps
        else:
            self.calls += 1
            scalars = self._check(plan, layer, query, key, value, out, scale, softcap,
                                  sliding_window, relative_bias)
        if meta.slot_mapping is not None:
            self._append.append_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        if (meta.shared_prefix is not None and self.shared_prefix_decode and not scalars[2]
                and relative_bias is None and not torch.compiler.is_compiling()):
            attend_shared_prefix(query, k_cache, v_cache, meta.shared_prefix, out,
                                 scale=scalars[0], softcap=scalars[1])
            return out if out.dtype == dtype else out.to(dtype)
        if not meta.decode_only:
            impl = self._prefill
        elif relative_bias is None:
            impl = self._decode
        else:
            impl = self._decode_bias()
        impl.paged_attention(
            query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
            None if meta.decode_only else meta.cu_seqlens_q, out, scale=scalars[0],
            causal=meta.causal, softcap=scalars[1], sliding_window=scalars[2],
            alibi_slopes=None, relative_bias=relative_bias, workspace=meta.workspace)
        return out if out.dtype == dtype else out.to(dtype)

    def _decode_bias(self):
        """The decode form's backend for calls with a relative bias (resolved on first use:
        ``auto`` may pick another backend than for plain decode)."""
        if self._decode_with_bias is None:
            self._decode_with_bias = _backends.resolve(self._backend, "paged_relative_bias",
                                                       self.device, self.head_dim)
        return self._decode_with_bias

    def _check(self, plan, layer, query, key, value, out, scale, softcap, window,
               relative_bias) -> tuple:
        """The public ops' shape / dtype / device / scalar checks, once per layer signature."""
        meta = plan.attn
        signature = (query.shape[1:], key.shape[1:], value.shape, query.dtype, key.dtype,
                     value.dtype, query.device, query.stride(-1), key.stride(-1),
                     value.stride(-1), query.shape[0] == key.shape[0] == plan.num_tokens,
                     meta.slot_mapping is None, scale, softcap, window,
                     relative_bias is None)
        known = self._checked.get(layer)
        if known is not None and known[0] == signature:
            return known[1]
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        if meta.slot_mapping is not None:
            append_kv_args(key, value, k_cache, v_cache, meta.slot_mapping)
        paged_attention_args(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                             None if meta.decode_only else meta.cu_seqlens_q, scale=scale,
                             causal=meta.causal, softcap=softcap or None,
                             sliding_window=window or None,
                             alibi_slopes=None, relative_bias=relative_bias, out=out,
                             workspace=meta.workspace)
        scalars = _scalars(scale, softcap, window)
        self._checked[layer] = (signature, scalars)
        return scalars


def _scalars(scale, softcap, window) -> tuple[float, float, int]:
    """(scale, softcap with 0 = off, window with 0 = off) as the backends take them."""
    window = 0 if window is None or window <= 0 else min(int(window), _INT32_MAX)
    return float(scale), float(softcap or 0.0), window
