"""The step plan: what one forward pass over a paged KV cache needs besides the weights.

Torch only (no transformers): shared by ``fastdecode.generate`` and the Engine, and the base
of decoding strategies that change block tables between steps (beam search forks through the
engine's block manager), pack several tokens per sequence (speculative verification) or
discard a step's writes (``slot_mapping`` entries of -1).

- :mod:`.staging`: one preallocated host buffer (pinned on CUDA) and its device twin; a step's
  inputs are written on the host and sent with one non-blocking copy.
- :mod:`.step`: :class:`StepPlanner` builds a :class:`StepPlan` (token ids, positions, block
  tables, slot mapping, ``cu_seqlens_q``, ``logits_indices``) once per step.
- :mod:`.attention`: :class:`PagedKVCache`, every layer's cache and the per-layer call through
  the backends resolved once.
- :mod:`.sampling`: :class:`Sampler`, the step's sampling parameters (scalars when the batch
  shares them) and the one sampling call.
"""

from fastdecode.plan.attention import PagedKVCache
from fastdecode.plan.sampling import Sampler, SamplingBatch
from fastdecode.plan.staging import Staging
from fastdecode.plan.step import AttentionMeta, StepPlan, StepPlanner

__all__ = ["AttentionMeta", "PagedKVCache", "Sampler", "SamplingBatch", "Staging", "StepPlan",
           "StepPlanner"]
