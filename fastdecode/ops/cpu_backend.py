"""``backend="cpu"``: the C++ kernels of ``fastdecode._C`` on CPU tensors."""

# The C++ adapters check every id on the host before a kernel follows it (csrc/cpu/
# value_checks.h, the same rules as fastdecode.ops._attention_checks, raising ValueError): the
# public ops leave those checks to them.
CHECKS_VALUES = True

from fastdecode.ops import _extension  # noqa: F401  (loads the extension, registers fakes)
from fastdecode.ops._cxx_ops import (  # noqa: F401
    append_kv,
    apply_repetition_penalty,
    contrastive_logits,
    paged_attention,
    process_logits,
    sample,
)
