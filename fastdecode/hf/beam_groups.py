"""Diverse (group) beam search of ``fastdecode.generate``, on the shared paged cache.

transformers 5 moved group beam search out of the library (it needs remote code since); this
follows the semantics of transformers 4.5x (``group_beam_search`` with ``BeamSearchScorer``
and ``HammingDiversityLogitsProcessor``). The K beams of a prompt form ``num_beam_groups``
groups of S = K / groups beams, searched one group after the other within a step:

- a group's log-probabilities are first lowered by ``diversity_penalty`` times the number of
  times each token was chosen by the earlier groups of the same prompt in this step, then go
  through the other processors (4.5x put the diversity processor first);
- its best ``max(2, 1 + #eos) * S`` continuations are ranked; EOS continuations among the first
  S become finished hypotheses of the group (score / new_length ** length_penalty, the best S
  kept), the first S others continue;
- a group is done once it holds S hypotheses and, by ``early_stopping``, no running beam can beat
  them; its beams then only carry padding (and count as padding for the diversity penalty);
- at the end the running beams of unfinished groups join their hypotheses; a prompt returns its
  ``num_return_sequences`` best hypotheses over all groups, the first EOS id appended to those
  shorter than the output, then padding.

Everything is batched over prompts (``[B, ...]`` tensors on the device); the loop over groups is
a loop over a handful of Python ints. ``beam_indices`` are rows of the flat ``[B * K]`` beams.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.hf.beam import BeamResult, _gather, start
from fastdecode.hf.beam_cache import BeamKV
from fastdecode.hf.options import Options
from fastdecode.hf.sampling import TokenSelector

_NEG = -1.0e9


def check_groups(opts: Options, streamer=None) -> None:
    """Raises ValueError, as transformers 4.5x did, for options diverse beam search rejects."""
    if streamer is not None:
        raise ValueError("diverse beam search (num_beam_groups > 1) does not support streaming")
    groups, beams = opts.num_beam_groups, opts.num_beams
    if groups > beams or beams % groups:
        raise ValueError(f"num_beams ({beams}) must be a multiple of num_beam_groups ({groups})")
    if opts.do_sample:
        raise ValueError("diverse beam search (num_beam_groups > 1) requires do_sample=False")
    if not opts.diversity_penalty > 0.0:
        raise ValueError("diversity_penalty must be > 0 with num_beam_groups > 1 (otherwise the "
                         f"groups are identical), got {opts.diversity_penalty}")


class GroupBeamSearch:
    """Drives :class:`BeamKV` with diverse beam search (see the module docstring)."""

    def __init__(self, kv: BeamKV, selector: TokenSelector, opts: Options):
        self.kv, self.selector, self.opts = kv, selector, opts
        self.groups, self.penalty = opts.num_beam_groups, opts.diversity_penalty
        self.size = opts.num_beams // self.groups  # beams per group
        eos = len(opts.eos) if opts.eos else 0
        self.keep = max(2, 1 + eos) * self.size

    def run(self, input_ids: torch.Tensor, penalty_mask: Optional[torch.Tensor]) -> BeamResult:
        """input_ids: [B * K, L] (each prompt repeated K times); penalty_mask as in
        :meth:`fastdecode.hf.beam.BeamSearch.run`."""
        opts, kv, k, s = self.opts, self.kv, self.opts.num_beams, self.size
        batch, length = kv.batch, input_ids.shape[1]
        dev = input_ids.device
        width = length + opts.max_new_tokens
        pad = opts.pad if opts.pad is not None else 0
        self.eos = torch.tensor(opts.eos, device=dev) if opts.eos else None
        seq = input_ids.new_full((batch, k, width), pad)
        seq[:, :, :length] = input_ids.view(batch, k, length)
        score = torch.full((batch, k), _NEG, device=dev)
        score[:, ::s] = 0.0  # the first beam of each group starts each group
        idx = torch.full((batch, k, width - length), -1, dtype=torch.int32, device=dev)
        # Hypotheses per prompt and group: [B, G, S, ...]; an empty slot scores -inf.
        self.hyp_seq = seq.new_full((batch, self.groups, s, width), pad)
        self.hyp_len = torch.zeros(batch, self.groups, s, dtype=torch.long, device=dev)
        self.hyp_score = torch.full((batch, self.groups, s), float("-inf"), device=dev)
        self.hyp_idx = idx.new_full((batch, self.groups, s, width - length), -1)
        self.done = torch.zeros(batch, self.groups, dtype=torch.bool, device=dev)
        result = BeamResult(input_ids, None, None)
        logits, prompt_seen = start(kv, opts, input_ids, penalty_mask)
        cur = length
        rows = torch.arange(batch, device=dev)[:, None] * k
        while True:
            logits = logits.to(dev)
            log_probs = torch.log_softmax(logits, -1).view(batch, k, -1)
            processed = torch.empty_like(log_probs)
            tokens = seq.new_full((batch, k), pad)
            parents = torch.empty(batch, k, dtype=torch.long, device=dev)
            new_score = torch.empty_like(score)
            for g in range(self.groups):
                beams = slice(g * s, (g + 1) * s)
                scores = self._process(log_probs[:, beams], tokens[:, :g * s],
                                       seq[:, beams, :cur], prompt_seen, cur, g)
                processed[:, beams] = scores
                tokens[:, beams], parents[:, beams], new_score[:, beams] = self._step_group(
                    g, scores, score[:, beams], seq[:, beams], idx[:, beams], cur, length, pad)
            if opts.return_dict and opts.output_scores:
                result.scores.append(self._recorded(processed, score).flatten(0, 1))
            if opts.return_dict and opts.output_logits:
                result.logits.append(logits)
            seq, idx, score = _gather(seq, parents), _gather(idx, parents), new_score
            seq[:, :, cur] = tokens
            idx[:, :, cur - length] = (parents + rows).int()
            cur += 1
            hits = self._stops(seq[:, :, :cur], tuple(result.scores))
            stop = self.done.all() | hits.all()
            flat = (parents + rows).flatten()
            *flat, stop = torch.cat([flat, stop.long()[None]]).tolist()
            kv.reorder(flat)
            if stop:
                return self._output(seq, score, idx, cur, length, result)
            logits = kv.decode(tokens.flatten())

    def _recorded(self, processed: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The step's ``scores`` entry [B, K, V]: the processed log-probabilities (4.5x)."""
        return processed

    def _joins(self, g: int) -> torch.Tensor:
        """[B, 1 or S] bool: the running beams of group g that join its hypotheses at the end
        (those of open groups)."""
        return ~self.done[:, g, None]

    def _process(self, log_probs, earlier, history, prompt_seen, cur: int, g: int):
        """A group's processed scores [B, S, V]: the diversity penalty against the tokens the
        earlier groups chose (``earlier`` [B, g * S]), then the call's other processors."""
        batch, s, vocab = log_probs.shape
        if g:
            counts = torch.zeros(batch, vocab + 1, device=log_probs.device)
            counts.scatter_add_(1, earlier.clamp(0, vocab),
                                torch.ones_like(earlier, dtype=counts.dtype))
            log_probs = log_probs - self.penalty * counts[:, None, :vocab]
        flat = history.flatten(0, 1)
        seen = None
        if prompt_seen is not None:
            prompt = prompt_seen.view(batch, -1, prompt_seen.shape[1])[:, :s].flatten(0, 1)
            seen = torch.cat([prompt, flat[:, prompt.shape[1]:]], 1)
        out = self.selector.process(log_probs.flatten(0, 1), flat, seen,
                                    ban_eos=self.eos is not None and cur < self.opts.min_length)
        return out.view(batch, s, vocab)

    def _step_group(self, g: int, scores, score, seq, idx, cur: int, length: int, pad: int):
        """One group's step -> (tokens [B, S], parent beams [B, S] (within the prompt's K),
        running scores [B, S]); files the group's finished hypotheses."""
        batch, s, vocab = scores.shape
        total = (scores + score[:, :, None]).view(batch, -1)
        cand_score, cand = torch.topk(total, self.keep)
        parent, token = cand // vocab, cand % vocab
        ends = (torch.isin(token, self.eos) if self.eos is not None
                else torch.zeros_like(token, dtype=torch.bool))
        rank = torch.arange(self.keep, device=scores.device)
        open_ = ~self.done[:, g, None]
        # The first S continuations that do not end, in rank order.
        pick = torch.topk(torch.where(ends, self.keep + rank, rank), s, largest=False)[1]
        self._file(g, cand_score, _gather(seq, parent), _gather(idx, parent), parent,
                   ends & (rank < s) & open_, cur, length)
        new_len = cur + 1 - length
        best = cand_score[:, 0]
        self._close(g, best, new_len, length, open_[:, 0])
        tokens = torch.where(open_, token.gather(1, pick), pad)
        parents = torch.where(open_, parent.gather(1, pick), torch.arange(s, device=scores.device))
        return tokens, parents + g * s, torch.where(open_, cand_score.gather(1, pick), 0.0)

    def _file(self, g: int, cand_score, cand_seq, cand_idx, parent, add, cur: int,
              length: int) -> None:
        """Adds the candidates ``add`` [B, keep] (ended at ``cur``, EOS not stored) to group g's
        hypotheses, keeping the best S."""
        score = torch.where(add, cand_score / ((cur + 1 - length) ** self.opts.length_penalty),
                            float("-inf"))
        cand_idx = cand_idx.clone()
        cand_idx[:, :, cur - length] = (parent + g * self.size
                                        + torch.arange(score.shape[0], device=score.device)[:, None]
                                        * self.opts.num_beams).int()
        self._merge(g, score, cand_seq, torch.full_like(parent, cur), cand_idx)

    def _merge(self, g: int, score, seq, lengths, idx) -> None:
        merged = torch.cat([self.hyp_score[:, g], score], 1)
        best = torch.topk(merged, self.size)[1]
        self.hyp_score[:, g] = merged.gather(1, best)
        self.hyp_seq[:, g] = _gather(torch.cat([self.hyp_seq[:, g], seq], 1), best)
        self.hyp_len[:, g] = torch.cat([self.hyp_len[:, g], lengths], 1).gather(1, best)
        self.hyp_idx[:, g] = _gather(torch.cat([self.hyp_idx[:, g], idx], 1), best)

    def _close(self, g: int, best, new_len: int, length: int, open_) -> None:
        """4.5x's ``BeamHypotheses.is_done`` for group g (best: the best candidate score [B])."""
        opts = self.opts
        full = torch.isfinite(self.hyp_score[:, g]).all(-1)
        if opts.early_stopping is True:
            closed = full
        else:
            if opts.early_stopping == "never" and opts.length_penalty > 0.0:
                new_len = opts.max_length - length
            worst = self.hyp_score[:, g].min(-1)[0]
            closed = full & (worst >= best / new_len ** opts.length_penalty)
        self.done[:, g] |= open_ & closed

    def _stops(self, seq, recorded: tuple) -> torch.Tensor:
        """[B, K] bool: HF's stopping criteria on the running beams (all must hold to stop)."""
        batch, k, cur = seq.shape
        hits = torch.full((batch, k), cur >= self.opts.max_length, device=seq.device)
        if self.eos is not None:
            hits = hits | torch.isin(seq[:, :, -1], self.eos)
        for criterion in self.opts.criteria:
            hits = hits | torch.as_tensor(criterion(seq.flatten(0, 1), recorded or None),
                                          device=seq.device).view(batch, k)
        return hits

    def _output(self, seq, score, idx, cur: int, length: int, result: BeamResult) -> BeamResult:
        """Running beams of open groups join the hypotheses; the best over groups are returned."""
        opts, s = self.opts, self.size
        for g in range(self.groups):
            beams = slice(g * s, (g + 1) * s)
            final = score[:, beams] / ((cur - length) ** opts.length_penalty)
            final = torch.where(self._joins(g), final, float("-inf"))
            self._merge(g, final, seq[:, beams], torch.full_like(final, cur, dtype=torch.long),
                        idx[:, beams])
        r = opts.num_return_sequences
        order = self.hyp_score.flatten(1).sort(dim=-1, descending=True, stable=True)[1][:, :r]
        scores = self.hyp_score.flatten(1).gather(1, order).flatten()
        lengths = self.hyp_len.flatten(1).gather(1, order).flatten()
        seqs = _gather(self.hyp_seq.flatten(1, 2), order).flatten(0, 1)
        index = _gather(self.hyp_idx.flatten(1, 2), order).flatten(0, 1)
        out_len = min(int(lengths.max()) + 1, int(opts.max_length))
        columns = torch.arange(seqs.shape[1], device=seqs.device)
        pad = opts.pad if opts.pad is not None else 0
        seqs = torch.where(columns < lengths[:, None], seqs, pad)
        if opts.eos:
            seqs = torch.where(columns == lengths[:, None], opts.eos[0], seqs)
        result.sequences = seqs[:, :out_len]
        result.sequences_scores = scores
        result.beam_indices = index[:, :out_len - length]
        return result
