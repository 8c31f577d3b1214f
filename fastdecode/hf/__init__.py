"""Hugging Face transformers integration: the only package that imports transformers.

- :func:`generate`, :func:`patch`, :func:`unpatch`: drop-in ``model.generate``.
- :class:`PagedRunner`, :class:`PagedContext`: one packed forward over the paged KV cache
  (shared with the Engine).
"""

from fastdecode.hf.context import PagedContext
from fastdecode.hf.generate import FallbackError, generate
from fastdecode.hf.patching import patch, unpatch
from fastdecode.hf.runner import PagedRunner

__all__ = ["generate", "patch", "unpatch", "FallbackError", "PagedRunner", "PagedContext"]
