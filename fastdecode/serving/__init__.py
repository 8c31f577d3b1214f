"""Serving over the Engine: :class:`AsyncEngine` (an engine loop thread and ``async for``
streams), an OpenAI-compatible HTTP server (``fastdecode serve``; FastAPI + uvicorn, imported
only by :mod:`fastdecode.serving.server`), Ray Serve replicas (:mod:`fastdecode.serving.ray`)
and tensor parallelism under ``torch.distributed`` (:mod:`fastdecode.serving.tp`).
"""

from fastdecode.serving.async_engine import (AsyncEngine, EngineStepError, QueueFullError,
                                             RequestTimeoutError)

__all__ = ["AsyncEngine", "EngineStepError", "QueueFullError", "RequestTimeoutError"]
