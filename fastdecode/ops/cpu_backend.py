"""``backend="cpu"``: the C++ kernels of ``fastdecode._C`` on CPU tensors."""

from fastdecode.ops import _extension  # noqa: F401  (loads the extension, registers fakes)
from fastdecode.ops._cxx_ops import (  # noqa: F401
    append_kv,
    apply_repetition_penalty,
    paged_attention,
    process_logits,
    sample,
)
