"""Serving engine: requests, KV block manager, scheduler (no torch in these) and model runner."""

from fastdecode.engine.engine import Engine
from fastdecode.engine.params import RequestOutput, SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
