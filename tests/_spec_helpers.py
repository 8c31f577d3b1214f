"""Models with known behaviour and the statistics of the speculative-decoding tests."""

from __future__ import annotations

import copy

import torch
from scipy import stats

import reference
from tiny import tiny_model


def echo_model(scale: float = 1.0):
    """A Llama whose layers add nothing (output projections zeroed) and whose head is its
    embedding times ``scale``: the last token is the likeliest next one (greedy repeats it; a
    smaller scale makes the distribution flatter)."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data * scale)
    return model


def p_value(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of int samples against probs [V] float64; cells expecting
    fewer than 5 draws are pooled. 0 when a sample falls outside the support."""
    counts = torch.bincount(samples, minlength=probs.shape[0]).double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * samples.numel()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    return float(stats.chi2.sf(chi2, max(len(obs) - 1, 1)))


def exact_joint(model, prompt: torch.Tensor, steps: int, warp: dict) -> dict[tuple, float]:
    """Probability of every continuation of ``steps`` tokens under ``warp`` (temperature,
    top_k, top_p, min_p), float64."""
    model64 = copy.deepcopy(model).double()
    joint = {(): 1.0}
    for _ in range(steps):
        prefixes = list(joint)
        batch = torch.stack([torch.cat([prompt, torch.tensor(pre, dtype=torch.long)])
                             for pre in prefixes])
        with torch.no_grad():
            logits = model64(batch).logits[:, -1]
        probs = reference.distribution(logits, **warp)
        joint = {pre + (t,): joint[pre] * float(probs[i, t])
                 for i, pre in enumerate(prefixes) for t in probs[i].nonzero()[:, 0].tolist()}
    return joint
