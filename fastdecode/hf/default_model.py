"""The built-in default model of the command line (nothing is downloaded at run time).

A 3.5M-parameter Llama (4 layers, GQA 4/2 heads, head_dim 64) and its 2,048-token byte-level BPE
tokenizer, trained by ``tools/train_default_model.py`` on the Python standard library's docstrings
and shipped as float16 safetensors in ``fastdecode/data/default_model``.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default_model"


def default_model_and_tokenizer(dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` of the built-in default model, in ``dtype``, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True,
                                                 dtype=dtype)
    return model.eval(), tokenizer
