"""An independent, deliberately plain reference of constrained beam search for the tests.

transformers 5 no longer ships constrained beam search (``force_words_ids`` / ``constraints``
moved to a hub repository and need remote code), so the expected outputs come from this
re-statement of transformers 4.5x's algorithm: ``GenerationMixin._constrained_beam_search``,
``ConstrainedBeamSearchScorer`` (``process``, ``step_sentence_constraint`` without
``push_progress``, ``finalize``), ``BeamHypotheses`` with ``decoder_prompt_len`` and
``ConstraintListState`` / ``PhrasalConstraint`` / ``DisjunctiveConstraint``. It shares no code
with fastdecode: the model recomputes the whole sequence each step (no cache), scores are
float64, a constraint list's progress is a Python object replayed over the whole row (padding
included, as 4.5x replayed ``input_ids``), words are plain lists compared by prefix, and every
candidate is handled one at a time as 4.5x did. Where 4.5x's stateful copies of a disjunctive
constraint shared their progress list between sibling proposals, a proposal's bank here is the
bank of its own sequence (fastdecode does the same; see ``fastdecode/hf/beam_constrained.py``).

Returns ``(sequences [B * R, W], scores [B * R], gaps)``; ``gaps[b]`` is the smallest distance
between two candidate scores (or two ranking keys) prompt b compared, over all steps.
"""

from __future__ import annotations

import torch

from beam_reference import _best, _Hypotheses, _next_log_probs, _penalise


class _Progress:
    """4.5x's ConstraintListState over constraints given as lists of words."""

    def __init__(self, constraints: list[list[list[int]]]):
        self.words = constraints
        self.max_len = max(len(w) for c in constraints for w in c)
        self.complete: list[int] = []
        self.pending = list(range(len(constraints)))
        self.current: tuple[int, list[int]] | None = None  # (constraint, prefix so far)

    def _next(self, c: int, prefix: list[int]) -> list[int]:
        out = []
        for w in self.words[c]:
            if len(w) > len(prefix) and w[:len(prefix)] == prefix and w[len(prefix)] not in out:
                out.append(w[len(prefix)])
        return out

    def done(self) -> bool:
        return not self.pending and self.current is None

    def add(self, token: int) -> None:
        if self.done():
            return
        if self.current is not None:
            c, prefix = self.current
            self.current = None
            if token not in self._next(c, prefix):
                self.pending.append(c)  # restarts at the back; the token is not tried elsewhere
            elif prefix + [token] in self.words[c]:
                self.complete.append(c)
            else:
                self.current = (c, prefix + [token])
            return
        for c in self.pending:
            if token in self._next(c, []):
                self.pending.remove(c)
                if [token] in self.words[c]:
                    self.complete.append(c)
                else:
                    self.current = (c, [token])
                return

    def bank(self) -> int:
        partial = 0
        if self.current is not None:
            c, prefix = self.current
            partial = self.max_len - (max(len(w) for w in self.words[c]) - len(prefix))
        return len(self.complete) * self.max_len + partial

    def advance(self) -> list[int]:
        if self.current is not None:
            return self._next(*self.current)
        return [t for c in self.pending for t in self._next(c, [])]


def _progress(constraints, row: list[int]) -> _Progress:
    state = _Progress(constraints)
    for t in row:
        state.add(t)
    return state


def _min_gap(values: list[float]) -> float:
    finite = sorted(v for v in values if v > float("-inf"))
    return min((b - a for a, b in zip(finite, finite[1:])), default=float("inf"))


def constrained_beam_search(model, prompts: list[list[int]], constraints: list[list[list[int]]],
                            *, num_beams: int, max_new_tokens: int, eos: list[int] | None = None,
                            pad: int = 0, length_penalty: float = 1.0, early_stopping=False,
                            num_return_sequences: int = 1, repetition_penalty: float = 1.0,
                            no_repeat_ngram_size: int = 0):
    """constraints: per constraint its words (a phrase is one word), in 4.5x's order."""
    k, width = num_beams, max(len(p) for p in prompts)
    max_length = width + max_new_tokens
    beams = [[pad] * (width - len(p)) + list(p) for p in prompts for _ in range(k)]
    pads = [width - len(p) for p in prompts for _ in range(k)]
    scores = [0.0 if j == 0 else -1e9 for _ in prompts for j in range(k)]
    hyps = [_Hypotheses(k, length_penalty, early_stopping, max_length) for _ in prompts]
    done = [False] * len(prompts)
    gaps = [float("inf")] * len(prompts)
    keep = max(2, 1 + len(eos or [])) * k
    cur = width
    while True:
        log_probs = _next_log_probs(model, beams, pads, torch.float64)
        vocab = log_probs.shape[-1]
        new_beams, new_scores = list(beams), list(scores)
        for b in range(len(prompts)):
            rows = list(range(b * k, (b + 1) * k))
            if done[b]:
                for r in rows:
                    new_beams[r], new_scores[r] = beams[r] + [pad], 0.0
                continue
            total = [_penalise(log_probs[r], beams[r], pads[r], repetition_penalty,
                               no_repeat_ngram_size) + scores[r] for r in rows]
            top, index = torch.cat(total).topk(keep)
            gaps[b] = min(gaps[b], _min_gap(top.tolist()))
            chosen = []  # (score, parent row, token, bank)
            for rank, (score, flat) in enumerate(zip(top.tolist(), index.tolist())):
                parent, token = rows[flat // vocab], flat % vocab
                if eos and token in eos:
                    if rank < k and _progress(constraints, beams[parent]).done():
                        hyps[b].add(beams[parent], score, cur + 1 - width)
                    continue
                seq = beams[parent] + [token]
                chosen.append((score, parent, token, _progress(constraints, seq).bank()))
                if len(chosen) == k:
                    break
            seqs = [beams[p] + [t] for _, p, t, _ in chosen]
            proposed = False
            for j, r in enumerate(rows):
                state = _progress(constraints, beams[r])
                if state.done():
                    continue
                for t in state.advance():
                    seq = beams[r] + [t]
                    if seq not in seqs:
                        seqs.append(seq)
                        proposed = True
                        chosen.append((float(total[j][t]), r, t,
                                       _progress(constraints, seq).bank()))
            if proposed:
                ranked = sorted(chosen, key=lambda c: c[3] * 100 + c[0], reverse=True)
                gaps[b] = min(gaps[b], _min_gap([c[3] * 100 + c[0] for c in ranked]))
                turns, previous = [], None
                for c in ranked:
                    turns.append(turns[-1] + 1 if c[3] == previous else 0)
                    previous = c[3]
                chosen = [c for _, c in sorted(zip(turns, ranked), key=lambda x: x[0])]
            for r, (score, parent, token, _) in zip(rows, chosen[:k]):
                new_beams[r], new_scores[r] = beams[parent] + [token], score
            done[b] = hyps[b].is_done(top[0].item(), cur + 1, width)
        beams, scores = new_beams, new_scores
        cur += 1
        if all(done) or cur >= max_length or (eos and all(r[-1] in eos for r in beams)):
            break
    for b in range(len(prompts)):
        if done[b]:
            continue
        rows = range(b * k, (b + 1) * k)
        complete = [r for r in rows if _progress(constraints, beams[r]).done()]
        joining = rows if len(complete) < num_return_sequences else complete
        for r in joining:
            hyps[b].add(beams[r], scores[r], cur - width)
    found = [h.beams for h in hyps]
    return (*_best(found, num_return_sequences, eos, pad, max_length), gaps)
