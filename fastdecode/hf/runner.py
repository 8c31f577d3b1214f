"""``PagedRunner``: one forward pass of a transformers decoder over fastdecode's paged KV cache.

Interface shared with the Engine (keep it stable)::

    runner = PagedRunner(model, num_blocks=N, block_size=P, kv_dtype=None, device=None,
                         backend="auto")
    runner.k_caches, runner.v_caches   # per layer: [N, P, Hkv, D], zero-initialised
    logits = runner.forward(input_ids, positions, ctx)
        # input_ids, positions: [T] int64, the step's new tokens packed sequence after sequence;
        # ctx: PagedContext (block tables, seq_lens, cu_seqlens_q, slot_mapping, logits_indices);
        # returns [B, V] float32: the logits of each sequence's last new token.
    with runner.session():             # optional: switch the model once around many steps
        ...
    runner.grow(num_blocks)            # a larger pool; block ids and cached tokens stay valid

The model object is left as it was: the ``"fastdecode"`` attention implementation is switched on
only for the duration of a call or of a ``with runner.session():`` block (restored on exit, also
on error) and the weights are not touched.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch

from fastdecode.hf import attention as _attention
from fastdecode.hf import transform
from fastdecode.hf.context import PagedContext
from fastdecode.hf.tp import local_kv_heads
from fastdecode.ops.memory import allocate_kv_cache


def uses_attention_interface(model: torch.nn.Module) -> bool:
    """Whether every attention layer of ``model`` dispatches through ``AttentionInterface``.

    transformers marks such classes with ``_supports_attention_backend``; the runner also checks at
    its first call that each layer reached the paged attention function exactly once.
    """
    return bool(getattr(type(model), "_supports_attention_backend", False))


def has_unsupported_attention(model: torch.nn.Module) -> Optional[str]:
    """A reason the paged kernels cannot run ``model`` exactly (sinks, cross-attention), or None."""
    config = model.config.get_text_config()
    if getattr(model.config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention",
                                                                     False):
        return "cross-attention"
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            return "attention sinks (s_aux)"
    return None


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder, from its text config; under tensor
    parallelism, this rank's key/value heads."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if getattr(cfg, "multi_query", False):
        kv_heads = 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, local_kv_heads(model, kv_heads), head_dim


class PagedRunner:
    """Runs ``model`` on packed steps whose attention reads and writes a paged KV cache.

    model: a transformers ``*ForCausalLM`` whose attention goes through ``AttentionInterface``.
    num_blocks N, block_size P: cache geometry; kv_dtype: cache dtype (default: the model's);
    device: cache device (default: the model's); backend: ops backend for every call.
    fast_linears: run float32 linear layers on packed / fused weight copies and Llama-style
    RMSNorms fused (:mod:`fastdecode.hf.transform`); default: when
    :func:`~fastdecode.hf.transform.worth_it` (CPU models whose weights fit RAM comfortably).
    """

    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int = 16,
                 kv_dtype: Optional[torch.dtype] = None, device=None, backend: str = "auto",
                 fast_linears: Optional[bool] = None):
        if not uses_attention_interface(model):
            raise ValueError(f"{type(model).__name__} does not route its attention through "
                             "transformers' AttentionInterface; it cannot run on a paged cache")
        reason = has_unsupported_attention(model)
        if reason:
            raise ValueError(f"{type(model).__name__} uses {reason}, which the paged kernels do "
                             "not implement")
        param = next(model.parameters())
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.device = torch.device(device) if device is not None else param.device
        layers, self._kv_heads, self._head_dim = kv_shape(model)
        self.num_layers = layers
        self.kv_dtype = kv_dtype or param.dtype
        self.num_blocks = num_blocks
        pools = [self._allocate(num_blocks) for _ in range(layers)]
        self.k_caches = [k for k, _ in pools]
        self.v_caches = [v for _, v in pools]
        self._kv = _attention.LayerCaches(self.k_caches, self.v_caches)
        self._configs = _configs(model)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(
            model.forward).parameters
        self._verified = False
        self._active = False
        if fast_linears is None:
            fast_linears = transform.worth_it(model)
        self._layout = transform.LinearLayout(model) if fast_linears else None

    def _allocate(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        return allocate_kv_cache(num_blocks, self.block_size, self._kv_heads, self._head_dim,
                                 dtype=self.kv_dtype, device=self.device)

    def grow(self, num_blocks: int) -> None:
        """Enlarge every layer's pool to ``num_blocks`` blocks, keeping blocks ``0 ..
        self.num_blocks - 1`` (ids and contents). The pools are new tensors afterwards."""
        if num_blocks <= self.num_blocks:
            return
        for layer in range(self.num_layers):
            k, v = self._allocate(num_blocks)
            k[:self.num_blocks].copy_(self.k_caches[layer])
            v[:self.num_blocks].copy_(self.v_caches[layer])
            # In place: the LayerCaches handed to the attention shares these lists.
            self.k_caches[layer], self.v_caches[layer] = k, v
        self.num_blocks = num_blocks

    @contextmanager
    def session(self) -> Iterator[None]:
        """Switch the model to the ``"fastdecode"`` attention (and the fast linears) for the block.

        ``forward`` enters it per call; a decoding loop enters it once around all its steps so
        that the switch is not paid per step. Always restored on exit, also on error.
        """
        if self._active:
            yield
            return
        saved = [c._attn_implementation_internal for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation_internal = _attention.ATTN_NAME
            with self._layout.active() if self._layout else nullcontext():
                self._active = True
                yield
        finally:
            self._active = False
            for c, name in zip(self._configs, saved):
                c._attn_implementation_internal = name

    @torch.no_grad()
    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                ctx: PagedContext, *, inputs_embeds: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> [B, V] float32 logits at ``ctx.logits_indices``.

        inputs_embeds: [T, hidden_size] in place of input_ids (then None); token_type_ids: [T]
        int64, for models whose forward takes them.
        """
        extra = {}
        keep_all = ctx.decode_only  # one token per sequence: every row is a last token
        if self._takes_logits_to_keep and not keep_all:
            extra["logits_to_keep"] = ctx.logits_indices
        if inputs_embeds is not None:
            extra["inputs_embeds"] = inputs_embeds[None]
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids[None]
        self._kv.calls = 0
        with self.session():
            out = self.model(input_ids=None if input_ids is None else input_ids[None],
                             position_ids=positions[None], use_cache=False, fastdecode_ctx=ctx,
                             fastdecode_kv=self._kv, **extra)
        if not self._verified:
            if self._kv.calls != self.num_layers:
                raise RuntimeError(
                    f"{type(self.model).__name__}: {self._kv.calls} attention calls reached the "
                    f"paged kernel for {self.num_layers} layers; its attention does not go "
                    "through AttentionInterface")
            self._verified = True
        logits = out.logits[0]
        if not keep_all and "logits_to_keep" not in extra:
            logits = logits[ctx.logits_indices]
        return logits.float()


def _configs(model: torch.nn.Module) -> list:
    """Every distinct config object the model's modules read ``_attn_implementation`` from."""
    seen: dict[int, object] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())
