"""Native decoder steps: the model families fastdecode computes itself (Llama family; T5, BART
and Marian decoders), without transformers' module tree (no transformers import in this package).

:func:`unsupported_reason` decides (an explicit allow-list), :func:`native_step` builds the step;
:class:`fastdecode.hf.PagedRunner` selects it (``FASTDECODE_NATIVE=0`` or ``native=False``
keeps the HF modules).
"""

from fastdecode.models.llama import LlamaStep, native_step
from fastdecode.models.seq2seq import Seq2SeqStep
from fastdecode.models.support import hooked, unsupported_reason

__all__ = ["LlamaStep", "Seq2SeqStep", "native_step", "unsupported_reason", "hooked"]
