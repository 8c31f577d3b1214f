"""Public op ``contrastive_logits``: the fused scores of contrastive decoding.

Contrastive decoding (Li et al. 2022, "Contrastive Decoding: Open-ended Text Generation as
Optimization") scores a token by how much more the expert model believes in it than a smaller
amateur model, among the tokens the expert itself finds plausible:

    plausible(x) = p_e(x) >= plausibility * max_w p_e(w)        (and p_e(x) > 0)
    score(x)     = log p_e(x) - alpha * log p_a(x)   if plausible(x), else -inf

with p_e / p_a the softmax of the expert / amateur logits. Li et al. use alpha = 1 (their
"alpha" is our ``plausibility``, 0.1 in their experiments); O'Brien & Lewis 2023 ("Contrastive
Decoding Improves Reasoning in Large Language Models") weight the amateur by beta and score
``(1 + beta) s_e - beta s_a`` on logits, which within one row differs from
``log p_e - (beta / (1 + beta)) log p_a`` by a positive factor and a per-row constant: the same
ranking, and the same distribution after any temperature. This op implements the log-probability
form with a free ``alpha`` so that both papers' settings are one number away, and because
log-probabilities (unlike raw logits) do not depend on each model's arbitrary logit offset.
"""

from __future__ import annotations

import torch

from fastdecode.ops import _backends
from fastdecode.ops._params import Param, per_row_rule
from fastdecode.ops.sampling import _logits


def contrastive_logits(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, *,
                       alpha: Param = 1.0, plausibility: Param = 0.1,
                       backend: str = "auto") -> torch.Tensor:
    """Contrastive-decoding scores (formula in the module docstring).

    expert_logits, amateur_logits: [num_seqs, vocab_size], any float dtypes (not necessarily the
    same; float64 is converted to float32), read only, computed in float32.
    alpha (in [0, 1e6]) and plausibility (in [0, 1]): numbers or [num_seqs] tensors.

    Returns [num_seqs, vocab_size] float32: -inf outside the plausible set. A row whose expert or
    amateur logits hold a NaN or +inf, or no finite value, is all NaN (``ops.sample`` then
    returns -1 for it, as for any NaN row). Where the amateur gives a plausible token zero
    probability (a -inf logit) and alpha > 0 the score is +inf.
    """
    expert = _logits(expert_logits, amateur_logits=amateur_logits, alpha=alpha,
                     plausibility=plausibility)
    amateur = _logits(amateur_logits)
    for name, t in (("expert_logits", expert), ("amateur_logits", amateur)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be [num_seqs, vocab_size], got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if amateur.shape != expert.shape:
        raise ValueError(f"amateur_logits must have the shape of expert_logits "
                         f"{tuple(expert.shape)}, got {tuple(amateur.shape)}")
    batch, dev = expert.shape[0], expert.device
    alpha_rows = per_row_rule("contrastive_alpha", alpha, batch, dev, label="alpha")
    plausibility_rows = per_row_rule("plausibility", plausibility, batch, dev)
    impl = _backends.resolve(backend, "contrastive_logits", dev)
    return impl.contrastive_logits(expert.contiguous(), amateur.contiguous(), alpha_rows,
                                   plausibility_rows)
