"""Tensor-parallel loading through transformers' own plans (``tp_plan="auto"``).

transformers shards a model over the default ``torch.distributed`` process group (gloo on CPU,
NCCL on GPUs) following the family's ``base_model_tp_plan``: for most families the query, key
and value projections are split by columns, so each rank's attention sees only its own heads,
and the output projection's row split ends in an all-reduce. The paged cache of a rank then
holds only its key/value heads (:func:`local_kv_heads`). Families whose plan gathers the
attention projections' outputs (every rank computing every head) gain nothing from a sharded
cache and are refused, as are families without a plan in the installed release.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

import torch

# Plan styles under which a projection's output holds only this rank's heads.
_SHARDED_BY_HEADS = ("colwise",)


def attention_plan(config) -> dict[str, str]:
    """The installed release's tensor-parallel plan of the family of ``config`` (may be {})."""
    return dict(getattr(config.get_text_config(), "base_model_tp_plan", None) or {})


def _style(plan: dict[str, str], projection: str) -> Optional[str]:
    for pattern, style in plan.items():
        if fnmatch.fnmatch(f"layers.0.self_attn.{projection}", pattern):
            return style
    return None


def heads_are_sharded(config) -> bool:
    """Whether the family's plan splits the query / key / value projections by heads."""
    plan = attention_plan(config)
    return all(_style(plan, p) in _SHARDED_BY_HEADS for p in ("q_proj", "k_proj", "v_proj"))


def local_kv_heads(model: torch.nn.Module, kv_heads: int) -> int:
    """This rank's key/value heads: ``kv_heads`` split over the model's tensor-parallel ranks
    (all of them for a model that was not sharded)."""
    tp = getattr(model, "tp_size", None) or 1
    return kv_heads // tp if tp > 1 and heads_are_sharded(model.config) else kv_heads


def load_sharded(path: str, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer or None)`` from a local checkpoint, sharded over the default process
    group (which must be initialised) by the family's tensor-parallel plan."""
    import torch.distributed as dist
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    world = dist.get_world_size()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    text = config.get_text_config()
    family = type(config).__name__
    if not heads_are_sharded(config):
        raise ValueError(f"{family}: transformers {transformers.__version__} has no "
                         f"tensor-parallel plan splitting its attention by heads "
                         f"({attention_plan(config) or 'no plan'})")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % world or kv_heads % world:
        raise ValueError(f"{family}: {heads} query and {kv_heads} key/value heads cannot be "
                         f"split over {world} ranks")
    try:  # the releases that deprecate the standalone keyword take a DistributedConfig
        from transformers.distributed import DistributedConfig
        sharding = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:
        sharding = {"tp_plan": "auto"}
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                 **sharding)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer
