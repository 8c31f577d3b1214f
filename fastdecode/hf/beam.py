"""Beam search and beam sampling of ``fastdecode.generate``, on the shared paged cache.

The search keeps HF's semantics (``GenerationMixin._beam_search`` of transformers 5): per prompt,
``num_beams`` running beams and ``num_beams`` finished hypotheses. Each step scores every
continuation of every running beam (log-softmax, then HF's processors; the warpers too when
sampling), keeps the best ``2 * num_beams`` (``(1 + #eos) * num_beams`` with several EOS ids) so
that enough of them do not finish, moves the finished ones among the first ``num_beams`` into
the hypotheses with the length penalty, and stops by HF's early-stopping rules. The arithmetic
on the scores is done in HF's order, so ``sequences_scores`` agree to float rounding.

All of it is batched tensor work on the device over ``[B, num_beams, ...]``; the one host read
per step is the beams' parents (which the cache needs for its block tables) and the stop flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fastdecode.hf.beam_cache import BeamKV
from fastdecode.hf.loop import _penalty_ids
from fastdecode.hf.options import Options
from fastdecode.hf.sampling import TokenSelector

_NEG = -1.0e9  # HF's "never pick this" offset


@dataclass
class BeamResult:
    """sequences: [B * R, L + new] (R = num_return_sequences, best first); sequences_scores:
    [B * R] float32 length-penalised scores; beam_indices: [B * R, new] int32 row of the beam each
    token continued (-1 after the hypothesis ended); scores / logits: per step [B * K, V] float32
    (processed log-probabilities / raw logits, when asked)."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor
    beam_indices: torch.Tensor
    scores: list = field(default_factory=list)
    logits: list = field(default_factory=list)


def _fill_value(opts: Options) -> int:
    """HF's filler of unused columns: pad (unless 0) or the first EOS; -1 without EOS."""
    if opts.eos is None:
        return -1
    return opts.pad if opts.pad else opts.eos[0]


def warp(scores: torch.Tensor, opts: Options, min_keep: int) -> torch.Tensor:
    """HF's sampling warpers in beam sampling: temperature -> top-k -> top-p -> min-p, each
    keeping at least ``min_keep`` tokens (1 + the number of EOS ids, so a beam can go on).
    scores: [R, V] float32 -> [R, V] float32, filtered tokens at -inf."""
    vocab = scores.shape[-1]
    if opts.temperature != 1.0:
        scores = scores / opts.temperature
    if opts.top_k != 0:
        kth = torch.topk(scores, min(max(opts.top_k, min_keep), vocab))[0][..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.top_p < 1.0:
        ascending, order = torch.sort(scores)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - opts.top_p
        drop[..., -min_keep:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if opts.min_p <= 0.0:  # HF's warper keeps every token then
        return scores
    probs = scores.softmax(-1)
    drop = probs < opts.min_p * probs.amax(-1, keepdim=True)
    drop.scatter_(-1, torch.topk(probs, min(min_keep, vocab)).indices, False)
    return scores.masked_fill(drop, float("-inf"))


def start(kv: BeamKV, opts: Options, input_ids: torch.Tensor,
          penalty_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Prefill -> (logits [B * K, V] float32, the prompt's ids as the repetition penalty sees
    them [B * K, L], or None without a penalty)."""
    logits = kv.prefill()
    if opts.repetition_penalty == 1.0:
        return logits, None
    return logits, _penalty_ids(input_ids, penalty_mask, logits.shape[-1])


class _Beams:
    """The search state of B prompts x K beams (all tensors on the device).

    run_seq / done_seq: [B, K, W] ids (W = prompt + max new tokens); run_score: [B, K] summed
    log-probabilities of the running beams; done_score: [B, K] length-penalised hypothesis
    scores (-1e9 = empty); run_idx / done_idx: [B, K, W - L] int32 parent rows per step;
    done: [B, K] bool, hypothesis slot filled; open_: [B, 1] bool, a running beam may still beat
    the worst hypothesis.
    """

    def __init__(self, input_ids: torch.Tensor, batch: int, opts: Options):
        k, length = opts.num_beams, input_ids.shape[1]
        dev = input_ids.device
        width = length + opts.max_new_tokens
        self.run_seq = input_ids.new_full((batch, k, width), _fill_value(opts))
        self.run_seq[:, :, :length] = input_ids.view(batch, k, length)
        self.done_seq = self.run_seq.clone()
        self.run_score = torch.zeros(batch, k, device=dev)
        self.run_score[:, 1:] = _NEG  # all beams are equal at first: expand the first only
        self.done_score = torch.full((batch, k), _NEG, device=dev)
        self.run_idx = torch.full((batch, k, width - length), -1, dtype=torch.int32, device=dev)
        self.done_idx = self.run_idx.clone()
        self.done = torch.zeros(batch, k, dtype=torch.bool, device=dev)
        self.open_ = torch.ones(batch, 1, dtype=torch.bool, device=dev)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t: [B, N, ...], index: [B, M] -> [B, M, ...] (t[b, index[b, m]])."""
    return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)


class BeamSearch:
    """Drives :class:`BeamKV` with HF's beam search (``do_sample`` -> beam sampling)."""

    def __init__(self, kv: BeamKV, selector: TokenSelector, opts: Options):
        self.kv, self.selector, self.opts = kv, selector, opts
        self.num_beams = opts.num_beams
        eos = len(opts.eos) if opts.eos else 0
        self.keep = max(2, 1 + eos) * opts.num_beams  # candidates kept per prompt and step
        self.min_keep = eos + 1 if opts.eos else 2

    def run(self, input_ids: torch.Tensor, penalty_mask: Optional[torch.Tensor]) -> BeamResult:
        """input_ids: [B * K, L] (each prompt repeated K times); penalty_mask: the attention mask
        HF's repetition penalty reads its ``prompt_ignore_length`` from (None: skip nothing)."""
        opts, kv, k = self.opts, self.kv, self.num_beams
        batch, length = kv.batch, input_ids.shape[1]
        dev = input_ids.device
        state = _Beams(input_ids, batch, opts)
        eos = torch.tensor(opts.eos, device=dev) if opts.eos else None
        first_k = torch.arange(self.keep, device=dev) < k
        rows = (torch.arange(batch, device=dev) * k)[:, None]
        keep_scores = opts.return_dict and opts.output_scores
        result = BeamResult(input_ids, None, None)
        logits, prompt_seen = start(kv, opts, input_ids, penalty_mask)
        cur = length
        while True:
            flat = state.run_seq[:, :, :cur].reshape(batch * k, cur)
            seen = None if prompt_seen is None else torch.cat([prompt_seen, flat[:, length:]], 1)
            logits = logits.to(dev)
            scores = self.selector.process(torch.log_softmax(logits, -1), flat, seen,
                                           ban_eos=eos is not None and cur < opts.min_length)
            if opts.do_sample:
                scores = warp(scores, opts, self.min_keep)
            if keep_scores:
                result.scores.append(scores)
            if opts.return_dict and opts.output_logits:
                result.logits.append(logits)
            vocab = scores.shape[-1]
            total = (scores.view(batch, k, vocab) + state.run_score[:, :, None]).view(batch, -1)
            cand_score, cand = self._candidates(total)
            parent = cand // vocab
            cand_seq = _gather(state.run_seq, parent)
            cand_seq[:, :, cur] = cand % vocab
            cand_idx = _gather(state.run_idx, parent)
            cand_idx[:, :, cur - length] = (parent + rows).int()
            hits = self._stops(cand_seq[:, :, :cur + 1], eos, tuple(result.scores))
            self._advance(state, cand_score, cand_seq, cand_idx, hits)
            self._finish(state, cand_score, cand_seq, cand_idx, hits & first_k, cur + 1 - length)
            cur += 1
            self._update_open(state, cur - length, length)
            go_on = (state.open_.any() & ~(state.done.all() & (opts.early_stopping is True))
                     & ~hits.all())
            parents = state.run_idx[:, :, cur - 1 - length].flatten()
            *parents, go_on = torch.cat([parents.long(), go_on.long()[None]]).tolist()
            kv.reorder(parents)
            if not go_on:
                return self._output(state, result, length)
            logits = kv.decode(state.run_seq[:, :, cur - 1].flatten())

    def _candidates(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """total: [B, K * V] summed log-probabilities -> the ``keep`` best (or, sampling, drawn
        without replacement from their softmax), best first: (scores, flat indices) [B, keep]."""
        if not self.opts.do_sample:
            return torch.topk(total, k=self.keep)
        drawn = torch.multinomial(total.softmax(-1), num_samples=self.keep)
        scores, order = total.gather(1, drawn).sort(dim=-1, descending=True)
        return scores, drawn.gather(1, order)

    def _stops(self, cand_seq: torch.Tensor, eos: Optional[torch.Tensor],
               recorded: tuple) -> torch.Tensor:
        """cand_seq: [B, keep, cur + 1] -> [B, keep] bool, the candidate ends here (max length,
        EOS, or one of the call's other stopping criteria)."""
        batch, keep, cur = cand_seq.shape
        hits = torch.full((batch, keep), cur >= self.opts.max_length, device=cand_seq.device)
        if eos is not None:
            hits = hits | torch.isin(cand_seq[:, :, -1], eos)
        if self.opts.criteria:
            flat = cand_seq.reshape(batch * keep, cur)
            for criterion in self.opts.criteria:  # may return a Python bool, as in HF
                hits = hits | torch.as_tensor(criterion(flat, recorded or None),
                                              device=hits.device).view(-1, keep)
        return hits

    def _advance(self, state: _Beams, cand_score, cand_seq, cand_idx, hits) -> None:
        """The K best candidates that did not end become the running beams."""
        score = cand_score + hits.to(torch.float32) * _NEG
        best = torch.topk(score, k=self.num_beams)[1]
        state.run_seq = _gather(cand_seq, best)
        state.run_score = _gather(score, best)
        state.run_idx = _gather(cand_idx, best)

    def _finish(self, state: _Beams, cand_score, cand_seq, cand_idx, ended, new_len: int) -> None:
        """Candidates among the first K that ended (``ended`` [B, keep]) replace worse
        hypotheses, unless the prompt is closed (early stopping, or no beam can improve)."""
        early = self.opts.early_stopping
        score = cand_score / (new_len ** self.opts.length_penalty)
        score += (state.done.all(-1, keepdim=True) & (early is True)).to(torch.float32) * _NEG
        score += (~state.open_).to(torch.float32) * _NEG
        score += (~ended) * _NEG
        merged = torch.cat((state.done_score, score), dim=1)
        best = torch.topk(merged, k=self.num_beams)[1]
        state.done_seq = _gather(torch.cat((state.done_seq, cand_seq), 1), best)
        state.done_score = _gather(merged, best)
        state.done_idx = _gather(torch.cat((state.done_idx, cand_idx), 1), best)
        state.done = _gather(torch.cat((state.done, ended), 1), best)

    def _update_open(self, state: _Beams, new_len: int, prompt_len: int) -> None:
        """HF's heuristic: a prompt stays open while its best running beam, at the best length
        it could reach, could beat its worst hypothesis."""
        opts = self.opts
        if opts.early_stopping == "never" and opts.length_penalty > 0.0:
            new_len = opts.max_length - prompt_len
        best = state.run_score[:, :1] / (new_len ** opts.length_penalty)
        worst = torch.where(state.done, state.done_score.min(1, keepdim=True)[0], _NEG)
        state.open_ = state.open_ & (best > worst).any(-1, keepdim=True)

    def _output(self, state: _Beams, result: BeamResult, length: int) -> BeamResult:
        r = self.opts.num_return_sequences
        index = state.done_idx[:, :r].flatten(0, 1)
        new = int((index + 1).bool().sum(1).max())
        result.sequences = state.done_seq[:, :r].flatten(0, 1)[:, :length + new]
        result.sequences_scores = state.done_score[:, :r].flatten()
        result.beam_indices = index[:, :new]
        return result
