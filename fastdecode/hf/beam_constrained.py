"""Constrained beam search of ``fastdecode.generate`` (``force_words_ids``, ``constraints``), on
the shared paged cache.

transformers 5 moved constrained beam search out of the library (remote code since); this
follows transformers 4.5x (``_constrained_beam_search`` with ``ConstrainedBeamSearchScorer`` and
``ConstraintListState``). Per prompt and step, with K beams:

- the best ``max(2, 1 + #eos) * K`` continuations of the summed scores (processed
  log-probabilities plus the beam's score) are ranked; an EOS among the first K files a
  hypothesis only if its beam already completes every constraint; the first K others are chosen;
- every running beam that has not completed its constraints also proposes each token that
  advances them (:meth:`~fastdecode.hf.constraints.Constraints.advance`), scored like any other
  continuation, unless the same sequence is already a candidate;
- if any was proposed, all candidates are ranked by ``bank * 100 + score`` (banks: constraint
  progress), then taken round-robin over runs of equal bank in that order (the best of each run,
  then the second of each, ...), and the first K run on; otherwise the chosen K run on as ranked;
- 4.5x's ``is_done`` closes a prompt as in beam search; at the end the running beams that
  complete the constraints join the hypotheses, and all of them when fewer than
  ``num_return_sequences`` do (the output may then miss a forced word, as in 4.5x);
- ``scores`` holds the summed scores, as 4.5x returned them.

One deliberate difference: a candidate's bank is the bank of its own sequence. 4.5x computed the
bank of proposed tokens on copies of one state that shared a disjunctive constraint's progress
list, so sibling branches of a disjunctive word could be banked as if both tokens were appended.
Everything is batched over prompts; the constraint progress is tensor state on the device.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.hf.beam import BeamResult, _gather
from fastdecode.hf.beam_groups import GroupBeamSearch
from fastdecode.hf.constraints import Constraints, parse
from fastdecode.hf.options import Options


def constrained(opts: Options) -> bool:
    """Whether the call forces words (HF's constrained beam search mode)."""
    return opts.constraints is not None or opts.force_words_ids is not None


def check_constraints(opts: Options, vocab: int, streamer, device) -> Constraints:
    """The call's compiled constraints; raises ValueError for options constrained beam search
    rejects (as 4.5x did) and malformed constraints."""
    flags = {"do_sample": opts.do_sample, "num_beam_groups": opts.num_beam_groups != 1}
    for flag, bad in flags.items():
        if bad:
            raise ValueError(f"force_words_ids / constraints select constrained beam search, "
                             f"which does not take {flag}={getattr(opts, flag)}")
    if opts.num_beams < 2:
        raise ValueError("force_words_ids / constraints need num_beams > 1 (constrained beam "
                         f"search), got num_beams={opts.num_beams}")
    if streamer is not None:
        raise ValueError("constrained beam search (force_words_ids / constraints) does not "
                         "support streaming")
    return Constraints(parse(opts.constraints, opts.force_words_ids, vocab), device)


class ConstrainedBeamSearch(GroupBeamSearch):
    """Drives :class:`~fastdecode.hf.beam_cache.BeamKV` with constrained beam search (one group
    of K beams; see the module docstring). ``self.state``: the running beams' constraint
    progress, [B, K]."""

    def __init__(self, kv, selector, opts: Options, constraints: Constraints):
        super().__init__(kv, selector, opts)
        self.constraints = constraints
        self.state = None

    def run(self, input_ids: torch.Tensor, penalty_mask: Optional[torch.Tensor]) -> BeamResult:
        """As :meth:`GroupBeamSearch.run`; the prompts' rows (padding included) set the
        constraint progress the beams start from."""
        k = self.opts.num_beams
        self.state = self.constraints.start(input_ids[::k]).expand(k)
        return super().run(input_ids, penalty_mask)

    def _recorded(self, processed: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """4.5x recorded the summed scores [B, K, V] (processed + the beam's score)."""
        return processed + score[:, :, None]

    def _joins(self, g: int) -> torch.Tensor:
        """Running beams of open prompts that complete the constraints (all of them where fewer
        than ``num_return_sequences`` do)."""
        complete = self.state.done()
        few = complete.sum(-1, keepdim=True) < self.opts.num_return_sequences
        return ~self.done[:, g, None] & (complete | few)

    def _step_group(self, g: int, scores: torch.Tensor, score: torch.Tensor, seq: torch.Tensor,
                    idx: torch.Tensor, cur: int, length: int, pad: int):
        """The step of all K beams -> (tokens [B, K], parent beams [B, K], running scores
        [B, K]); files the finished hypotheses and moves the constraint state on."""
        batch, k, vocab = scores.shape
        total = scores + score[:, :, None]
        cand_score, cand = torch.topk(total.view(batch, -1), self.keep)
        parent, token = cand // vocab, cand % vocab
        ends = (torch.isin(token, self.eos) if self.eos is not None
                else torch.zeros_like(token, dtype=torch.bool))
        rank = torch.arange(self.keep, device=scores.device)
        open_ = ~self.done[:, 0, None]
        complete = self.state.done().gather(1, parent)
        self._file(0, cand_score, _gather(seq, parent), _gather(idx, parent), parent,
                   ends & (rank < k) & open_ & complete, cur, length)
        self._close(0, cand_score[:, 0], cur + 1 - length, length, open_[:, 0])
        pick = torch.topk(torch.where(ends, self.keep + rank, rank), k, largest=False)[1]
        tokens, parents, new_score = self._bank(total, seq[:, :, :cur], token.gather(1, pick),
                                                parent.gather(1, pick), cand_score.gather(1, pick))
        own = torch.arange(k, device=scores.device)
        return (torch.where(open_, tokens, pad), torch.where(open_, parents, own),
                torch.where(open_, new_score, 0.0))

    def _bank(self, total: torch.Tensor, seq: torch.Tensor, tokens: torch.Tensor,
              parents: torch.Tensor, scores: torch.Tensor):
        """The K chosen continuations (tokens / parents / scores [B, K]) plus the tokens the
        running beams propose -> the K that run on, by bank; updates ``self.state``.
        total: [B, K, V] float32 summed scores; seq: [B, K, cur] the running beams' ids."""
        batch, k, vocab = total.shape
        dev = total.device
        proposed = self.constraints.advance(self.state)  # [B, K, A]
        width = proposed.shape[-1]
        cand_parent = torch.cat([parents, torch.arange(k, device=dev).repeat_interleave(width)
                                 .expand(batch, -1)], 1)
        cand_tok = torch.cat([tokens, proposed.flatten(1)], 1)
        valid = cand_tok >= 0
        cand_tok = cand_tok.clamp(min=0)
        flat = cand_parent[:, k:] * vocab + cand_tok[:, k:]
        cand_score = torch.cat([scores, total.view(batch, -1).gather(1, flat)], 1)
        # A proposal is dropped when an earlier candidate already is the same sequence.
        same_row = (seq[:, :, None] == seq[:, None]).all(-1).flatten(1)  # [B, K * K]
        n = cand_tok.shape[1]
        pairs = (cand_parent[:, :, None] * k + cand_parent[:, None]).flatten(1)
        same = (same_row.gather(1, pairs).view(batch, n, n)
                & (cand_tok[:, :, None] == cand_tok[:, None]) & valid[:, None])
        valid &= ~(same & torch.ones(n, n, dtype=torch.bool, device=dev).tril(-1)).any(-1)
        states = self.constraints.step(self.state.take(cand_parent), cand_tok)
        bank = self.constraints.bank(states)
        key = torch.where(valid, bank * 100 + cand_score, float("-inf"))
        order = key.sort(dim=1, descending=True, stable=True)[1]
        order = order.gather(1, (~valid).gather(1, order).int().sort(dim=1, stable=True)[1])
        ranked = bank.gather(1, order)
        position = torch.arange(n, device=dev).expand(batch, -1)
        change = torch.ones_like(valid)
        change[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
        run_start = torch.where(change, position, 0).cummax(1)[0]
        turn = torch.where(valid.gather(1, order), position - run_start, n)
        chosen = order.gather(1, turn.sort(dim=1, stable=True)[1][:, :k])
        proposed_any = valid[:, k:].any(-1, keepdim=True)
        chosen = torch.where(proposed_any, chosen, torch.arange(k, device=dev))
        self.state = states.take(chosen)
        return cand_tok.gather(1, chosen), cand_parent.gather(1, chosen), \
            cand_score.gather(1, chosen)
