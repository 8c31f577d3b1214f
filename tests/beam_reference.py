"""An independent, deliberately plain reference of diverse (group) beam search for the tests.

transformers 5 no longer ships group beam search (it moved to a hub repository and needs remote
code), so the expected outputs come from this re-statement of transformers 4.5x's algorithm
(``GenerationMixin._group_beam_search``, ``BeamSearchScorer`` / ``BeamHypotheses`` with
``decoder_prompt_len``, ``HammingDiversityLogitsProcessor``, and 4.5x's processor order that put
the diversity penalty first). It shares no code with fastdecode: the model recomputes the whole
sequence each step through its own forward (no cache), hypotheses are Python lists handled one
candidate at a time as 4.5x did, and only float32 log-softmax, the repetition penalty and the
n-gram ban are re-done here in the obvious way.

Returns ``(sequences [B * R, W], scores [B * R], gaps)``; ``gaps[b]`` is the smallest distance
between two of the candidate scores a group of prompt b ranked, over all steps (a near-tie
detector for the comparison).
"""

from __future__ import annotations

import torch


class _Hypotheses:
    def __init__(self, size: int, length_penalty: float, early_stopping, max_length: int):
        self.size, self.lp, self.early, self.max_length = size, length_penalty, early_stopping, max_length
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], logprob: float, generated: int) -> None:
        score = logprob / generated ** self.lp
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best: float, cur_len: int, prompt_len: int) -> bool:
        if len(self.beams) < self.size:
            return False
        if self.early is True:
            return True
        length = cur_len - prompt_len
        if self.early == "never" and self.lp > 0.0:
            length = self.max_length - prompt_len
        return self.worst >= best / length ** self.lp


def _next_log_probs(model, rows: list[list[int]], prompt_pad: list[int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[R, V] log-softmax (in ``dtype``) of the next token of each row (left padding masked)."""
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    for r, pad in enumerate(prompt_pad):
        mask[r, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    return torch.log_softmax(logits.to(dtype), -1)


def _penalise(scores: torch.Tensor, row: list[int], prompt_pad: int, penalty: float,
              ngram: int) -> torch.Tensor:
    scores = scores.clone()
    if penalty != 1.0:
        for t in set(row[prompt_pad:]):
            scores[t] = scores[t] * penalty if scores[t] < 0 else scores[t] / penalty
    if ngram:
        tail = row[len(row) - ngram + 1:]
        for i in range(len(row) - ngram + 1):
            if row[i:i + ngram - 1] == tail:
                scores[row[i + ngram - 1]] = float("-inf")
    return scores


def group_beam_search(model, prompts: list[list[int]], *, num_beams: int, num_beam_groups: int,
                      diversity_penalty: float, max_new_tokens: int, eos: list[int] | None = None,
                      pad: int = 0, length_penalty: float = 1.0, early_stopping=False,
                      num_return_sequences: int = 1, repetition_penalty: float = 1.0,
                      no_repeat_ngram_size: int = 0):
    width = max(len(p) for p in prompts)
    size = num_beams // num_beam_groups
    max_length = width + max_new_tokens
    beams = [[pad] * (width - len(p)) + list(p) for p in prompts for _ in range(num_beams)]
    pads = [width - len(p) for p in prompts for _ in range(num_beams)]
    scores = [0.0 if j % size == 0 else -1e9 for _ in prompts for j in range(num_beams)]
    hyps = [[_Hypotheses(size, length_penalty, early_stopping, max_length)
             for _ in range(num_beam_groups)] for _ in prompts]
    done = [[False] * num_beam_groups for _ in prompts]
    gaps = [float("inf")] * len(prompts)
    keep = max(2, 1 + len(eos or [])) * size
    cur = width
    while True:
        log_probs = _next_log_probs(model, beams, pads)
        vocab = log_probs.shape[-1]
        chosen = [pad] * len(beams)
        new_beams, new_scores = list(beams), list(scores)
        for b in range(len(prompts)):
            for g in range(num_beam_groups):
                rows = [b * num_beams + g * size + j for j in range(size)]
                earlier = chosen[b * num_beams:b * num_beams + g * size]
                total = []
                for r in rows:
                    s = log_probs[r].clone()
                    for t in earlier:
                        s[t] -= diversity_penalty
                    s = _penalise(s, beams[r], pads[r], repetition_penalty, no_repeat_ngram_size)
                    total.append(s + scores[r])
                top, index = torch.cat(total).topk(keep)
                finite = top[torch.isfinite(top)]
                if len(finite) > 1:
                    gaps[b] = min(gaps[b], float((finite[:-1] - finite[1:]).min()))
                if done[b][g]:
                    for r in rows:
                        chosen[r], new_scores[r] = pad, 0.0
                        new_beams[r] = beams[r] + [pad]
                    continue
                slot = 0
                for rank, (score, flat) in enumerate(zip(top.tolist(), index.tolist())):
                    parent, token = rows[flat // vocab], flat % vocab
                    if eos and token in eos:
                        if rank < size:
                            hyps[b][g].add(beams[parent], score, cur + 1 - width)
                        continue
                    r = rows[slot]
                    new_beams[r], new_scores[r], chosen[r] = beams[parent] + [token], score, token
                    slot += 1
                    if slot == size:
                        break
                done[b][g] = hyps[b][g].is_done(top[0].item(), cur + 1, width)
        beams, scores = new_beams, new_scores
        cur += 1
        finished = all(all(d) for d in done)
        if finished or cur >= max_length or (eos and all(r[-1] in eos for r in beams)):
            break
    for b in range(len(prompts)):
        for g in range(num_beam_groups):
            if not done[b][g]:
                for j in range(size):
                    r = b * num_beams + g * size + j
                    hyps[b][g].add(beams[r], scores[r], cur - width)
    found = [[h for group in per_prompt for h in group.beams] for per_prompt in hyps]
    return (*_best(found, num_return_sequences, eos, pad, max_length), gaps)


def _best(found: list[list[tuple[float, list[int]]]], count: int, eos, pad: int,
          max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` best hypotheses of each prompt, 4.5x's layout: (sequences, scores)."""
    sequences, best_scores = [], []
    for hypotheses in found:
        ranked = sorted(hypotheses, key=lambda h: h[0])
        for _ in range(count):
            score, tokens = ranked.pop()
            sequences.append(tokens)
            best_scores.append(score)
    out = min(max(len(s) for s in sequences) + 1, max_length)
    rows = [s + ([eos[0]] if eos and len(s) < out else []) for s in sequences]
    rows = [r + [pad] * (out - len(r)) for r in rows]
    return torch.tensor(rows), torch.tensor(best_scores)
