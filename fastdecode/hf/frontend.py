"""What the command line needs from transformers: loading a checkpoint, its context, streaming text.

The command line itself never imports transformers; every failure to load becomes one
:class:`LoadError` with a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from transformers.utils import logging as hf_logging

from fastdecode.hf.default_model import DEFAULT_MODEL_DIR

__all__ = ["LoadError", "load", "context_length", "TextStreamer"]


class LoadError(Exception):
    """A checkpoint could not be loaded; the message is one line."""


def load(path: Optional[str], device: str, dtype: torch.dtype):
    """``(model, tokenizer)`` from a local checkpoint directory (None: the built-in default model),
    on ``device`` in ``dtype``, in eval mode. Nothing is downloaded."""
    hf_logging.disable_progress_bar()  # keep the terminal for the generated text
    folder = Path(path) if path else DEFAULT_MODEL_DIR
    if not folder.is_dir():
        raise LoadError(f"--model {path}: no such directory (a local checkpoint directory is "
                        "expected; nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise LoadError(f"--model {path}: not a transformers checkpoint (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"--model {path or folder}: cannot load the checkpoint: {first}") from None
    return model.to(device).eval(), tokenizer


def context_length(model) -> Optional[int]:
    """The most positions the model was built for (None when its config does not say)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)
