"""fastdecode: fast LLM decoding for Hugging Face transformers models.

- ``fastdecode.ops``: paged-KV attention and fused sampling ops (CUDA, Triton, CPU, torch).
- ``fastdecode.generate`` / ``patch`` / ``unpatch``: drop-in replacement of ``model.generate``.
- ``fastdecode.PhrasalConstraint`` / ``DisjunctiveConstraint``: forced words for constrained beam
  search (``generate(..., constraints=[...])``; transformers 5 no longer ships them).
- ``fastdecode.Engine``: continuous batching for serving stacks; ``fastdecode.AsyncEngine``: the
  same behind an engine loop thread, for asyncio servers (``fastdecode serve``).
"""

from fastdecode import ops
from fastdecode.engine import Engine, RequestOutput, SamplingParams

__version__ = "0.1.0"

__all__ = ["ops", "generate", "patch", "unpatch", "Engine", "AsyncEngine", "RequestOutput",
           "SamplingParams", "PhrasalConstraint", "DisjunctiveConstraint", "__version__"]


def __getattr__(name: str):
    # transformers is imported only when the HF integration is first used.
    if name in ("generate", "patch", "unpatch"):
        from fastdecode import hf

        return getattr(hf, name)
    if name in ("PhrasalConstraint", "DisjunctiveConstraint"):
        from fastdecode.hf import constraints

        return getattr(constraints, name)
    if name == "AsyncEngine":
        from fastdecode.serving import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'fastdecode' has no attribute {name!r}")
