"""The built-in default model of the command line (nothing is downloaded at run time).

A 3.5M-parameter Llama (4 layers, GQA 4/2 heads, head_dim 64) and its 2,048-token byte-level BPE
tokenizer, trained by ``tools/train_default_model.py`` on the Python standard library's docstrings
and shipped as float16 safetensors in ``fastdecode/data/default_model``; loaded by
:func:`fastdecode.hf.frontend.load` when no ``--model`` is given.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default_model"
