"""``PagedRunner``: one forward pass of a transformers decoder over fastdecode's paged KV cache.

Interface shared with the Engine (keep it stable)::

    runner = PagedRunner(model, num_blocks=N, block_size=P, kv_dtype=None, device=None,
                         backend="auto")
    runner.k_caches, runner.v_caches   # per layer: [N, P, Hkv, D], zero-initialised
    runner.kv                          # the same caches as a fastdecode.plan.PagedKVCache
    planner = runner.planner()         # a StepPlanner for these caches
    logits = runner.forward(input_ids, positions, plan)
        # input_ids, positions: [T] int64, the step's new tokens packed sequence after sequence;
        # plan: a StepPlan (or a PagedContext: block tables, seq_lens, cu_seqlens_q,
        # slot_mapping, logits_indices); returns [S, V] float32: the logits of the plan's
        # logits_indices (every row of a decode step).
    with runner.session():             # optional: switch the model once around many steps
        ...
    runner.grow(num_blocks)            # a larger pool; block ids and cached tokens stay valid

The model object is left as it was: the ``"fastdecode"`` attention implementation is switched on
only for the duration of a call or of a ``with runner.session():`` block (restored on exit, also
on error) and the weights are not touched.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Union

import torch

from fastdecode import models
from fastdecode.models import cpp_loop
from fastdecode.hf import attention as _attention
from fastdecode.hf import transform
from fastdecode.hf.context import PagedContext
from fastdecode.hf.tp import local_kv_heads
from fastdecode.plan import PagedKVCache, StepPlan, StepPlanner


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
    :func:`~fastdecode.hf.transform.worth_it` (CPU models whose weights fit RAM comfortably) and
    the median linear layer holds at least 2**18 weights (smaller products lose to plain
    ``nn.Linear``).
    native: run the native decoder step (:mod:`fastdecode.models`) in place of the HF modules.
    None (default): when the model is one it reproduces exactly, unless the environment sets
    ``FASTDECODE_NATIVE=0``; True: required (ValueError naming the reason otherwise); False:
    the HF modules. Calls with ``inputs_embeds`` / ``token_type_ids``, or while a forward hook
    sits on the model, its decoder or its LM head, take the HF modules either way.
    """

    attn_name = _attention.ATTN_NAME  # the attention implementation a session switches to

    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int = 16,
                 kv_dtype: Optional[torch.dtype] = None, device=None, backend: str = "auto",
                 fast_linears: Optional[bool] = None, native: Optional[bool] = None):
        if not uses_attention_interface(model):
            raise ValueError(f"{type(model).__name__} does not route its attention through "
                             "transformers' AttentionInterface; it cannot run on a paged cache")
        reason = has_unsupported_attention(model)
        if reason:
            raise ValueError(f"{type(model).__name__} uses {reason}, which the paged kernels do "
                             "not implement")
        layers, kv_heads, head_dim = kv_shape(model)
        qo_heads = local_kv_heads(model, model.config.get_text_config().num_attention_heads)
        self._setup(model, _configs(model), dict(num_layers=layers, num_kv_heads=kv_heads,
                                                 head_dim=head_dim, num_qo_heads=qo_heads),
                    num_blocks=num_blocks, block_size=block_size, kv_dtype=kv_dtype,
                    device=device, backend=backend, fast_linears=fast_linears, native=native)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(
            model.forward).parameters

    def _setup(self, model: torch.nn.Module, configs: list, geometry: dict, *, num_blocks: int,
               block_size: int, kv_dtype: Optional[torch.dtype], device, backend: str,
               fast_linears: Optional[bool], native: Optional[bool] = None) -> None:
        """What every runner holds: the paged caches of ``geometry`` (num_layers, num_kv_heads,
        head_dim, num_qo_heads), the configs a session switches, the fast linears, the native
        step when the model has one (see the class docstring)."""
        param = next(model.parameters())
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.device = torch.device(device) if device is not None else param.device
        self.num_layers = geometry["num_layers"]
        self.kv_dtype = kv_dtype or param.dtype
        self.kv = PagedKVCache(num_blocks=num_blocks, block_size=block_size,
                               dtype=self.kv_dtype, device=self.device, backend=backend,
                               **geometry)
        # The cache's own lists: grow() replaces their entries in place.
        self.k_caches, self.v_caches = self.kv.k_caches, self.kv.v_caches
        self._configs = configs
        self._verified = False
        self._active = False
        native_packed = fast_linears
        if fast_linears is None:
            fits = transform.worth_it(model)
            fast_linears = fits and _large_linears(model)
            native_packed = fits and (fast_linears or _cpp_loop(model))
        self.native = _select_native(model, native, native_packed)
        # The native step holds its own packed copies; the HF path's are built only without it.
        use_layout = fast_linears and self.native is None
        self._layout = transform.LinearLayout(model) if use_layout else None

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    def grow(self, num_blocks: int) -> None:
        """Enlarge every layer's pool to ``num_blocks`` blocks, keeping blocks ``0 ..
        self.num_blocks - 1`` (ids and contents). The pools are new tensors afterwards."""
        self.kv.grow(num_blocks)

    def planner(self, extra_fields: Optional[dict[str, torch.dtype]] = None) -> StepPlanner:
        """A :class:`~fastdecode.plan.StepPlanner` for this runner's caches (extra_fields: more
        staging fields, e.g. ``fastdecode.plan.sampling.FIELDS``)."""
        return StepPlanner(self.device, self.block_size, kv=self.kv, extra_fields=extra_fields)

    @contextmanager
    def session(self) -> Iterator[None]:
        """Switch the model to the ``attn_name`` attention (and the fast linears) for the block.

        ``forward`` enters it per call; a decoding loop enters it once around all its steps so
        that the switch is not paid per step. Always restored on exit, also on error.
        """
        if self._active:
            yield
            return
        saved = [c._attn_implementation_internal for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation_internal = self.attn_name
            with self._layout.active() if self._layout else nullcontext():
                self._active = True
                yield
        finally:
            self._active = False
            for c, name in zip(self._configs, saved):
                c._attn_implementation_internal = name

    @torch.no_grad()
    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                plan: Union[StepPlan, PagedContext], *,
                inputs_embeds: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> [S, V] float32 logits at ``plan.logits_indices``
        (every row when it is None).

        inputs_embeds: [T, hidden_size] in place of input_ids (then None); token_type_ids: [T]
        int64, for models whose forward takes them.
        """
        if isinstance(plan, PagedContext):
            plan = plan.plan(input_ids, positions)
        if (self.native is not None and inputs_embeds is None and token_type_ids is None
                and not models.hooked(self.model)):
            return self.native(input_ids, positions, plan, self.kv)
        extra = {}
        pick = plan.logits_indices
        if self._takes_logits_to_keep and pick is not None:
            extra["logits_to_keep"] = pick
        if inputs_embeds is not None:
            extra["inputs_embeds"] = inputs_embeds[None]
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids[None]
        calls = self.kv.calls
        with self.session():
            out = self.model(input_ids=None if input_ids is None else input_ids[None],
                             position_ids=positions[None], use_cache=False,
                             fastdecode_plan=plan, fastdecode_kv=self.kv, **extra)
        if not self._verified:
            calls = self.kv.calls - calls
            if calls != self.num_layers:
                raise RuntimeError(
                    f"{type(self.model).__name__}: {calls} attention calls reached the "
                    f"paged kernel for {self.num_layers} layers; its attention does not go "
                    "through AttentionInterface")
            self._verified = True
        logits = out.logits[0]
        if pick is not None and "logits_to_keep" not in extra:
            logits = logits[pick]
        return logits.float()


# Median weights of a model's linear layers below which the packed copies lose: oneDNN's fixed
# cost per call exceeds the product itself (64- and 256-wide models decode faster with plain
# nn.Linear; the 135M model's 576 x 576 and 576 x 1536 products gain).
_FAST_LINEAR_MIN_WEIGHTS = 1 << 18


def _select_native(model: torch.nn.Module, native: Optional[bool],
                   packed: bool) -> Optional[models.LlamaStep]:
    """The native step of ``model`` when chosen (see :class:`PagedRunner`'s ``native``)."""
    if native is None:
        native = os.environ.get("FASTDECODE_NATIVE", "1") != "0"
        required = False
    else:
        required = native
    if not native:
        return None
    reason = models.unsupported_reason(model)
    if reason is None:  # fused copies only where the HF path would afford packed ones
        return models.native_step(model, packed=packed, fuse=transform.worth_it(model))
    if required:
        raise ValueError(f"native=True: the native step cannot run this model: {reason}")
    return None


def _cpp_loop(model: torch.nn.Module) -> bool:
    """Whether a decoder-only model's native step may take the C++ layer loop, which needs packed
    products: there they pay at any size, the per-call cost of nn.Linear being gone with the
    Python loop (built-in 3.5M model, batch 8, greedy: 1.14-1.17 ms per step packed against
    1.43-1.47 ms with nn.Linear, alternated runs)."""
    return not getattr(model.config, "is_encoder_decoder", False) and cpp_loop.available()


def _large_linears(model: torch.nn.Module) -> bool:
    sizes = sorted(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return bool(sizes) and sizes[len(sizes) // 2] >= _FAST_LINEAR_MIN_WEIGHTS


def _configs(model: torch.nn.Module) -> list:
    """Every distinct config object the model's modules read ``_attn_implementation`` from."""
    seen: dict[int, object] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())
