"""Contrastive search as transformers defined it before the method moved out of the library
(``_contrastive_search`` / ``_ranking_fast`` of the 4.5x releases), re-derived as a plain float64
loop: every step re-runs the whole sequence and each candidate without any cache.

Per step: p = softmax(logits of the last token); the top-k tokens c are scored by
``(1 - alpha) * p(c) - alpha * max_s cos(h(seq + c)[-1], h(seq)[s])`` with h the decoder's last
hidden states (``hidden_states[-1]``), s over every token of the row so far; the best wins (the
first on ties).
"""

from __future__ import annotations

import copy

import torch


def contrastive_search(model, prompt: list[int], alpha: float, top_k: int,
                       steps: int) -> tuple[list[int], list[float]]:
    """(new tokens, per step the gap between the best and second-best contrastive score)."""
    model64 = copy.deepcopy(model).double()
    seq, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out = model64(torch.tensor([seq]), output_hidden_states=True)
            context = out.hidden_states[-1][0]  # [S, D]
            probs = out.logits[0, -1].softmax(-1)
            top_p, top_ids = probs.topk(top_k)
            batch = torch.tensor([seq + [int(c)] for c in top_ids])
            hidden = model64(batch, output_hidden_states=True).hidden_states[-1][:, -1]  # [k, D]
            cosine = (hidden / hidden.norm(dim=-1, keepdim=True)) @ (
                context / context.norm(dim=-1, keepdim=True)).T
            score = (1 - alpha) * top_p - alpha * cosine.max(-1).values
            best = score.topk(2).values
            gaps.append(float(best[0] - best[1]))
            seq.append(int(top_ids[int(score.argmax())]))
    return seq[len(prompt):], gaps
