"""Speculative (assisted) decoding: a drafter proposes tokens, the target verifies them in one
packed forward over its paged cache, and the rejected tokens' slots are rolled back.

Drafters (:mod:`fastdecode.hf.drafters`): prompt lookup (``prompt_lookup_num_tokens``) and a draft
model (``assistant_model``). Greedy: a draft token is kept while it equals the target's argmax, so
the output is the target's own greedy output. Sampling: the rejection scheme of Leviathan et al.
(2023) / Chen et al. (2023): draft token ``d`` is kept with probability ``min(1, p(d) / q(d))``;
at the first rejection the token is drawn from ``max(p - q, 0)`` renormalised, and after ``k``
acceptances a bonus token is drawn from ``p``, so every token follows the target's processed
distribution ``p`` (temperature, top-k, top-p, min-p) exactly. A deterministic drafter is the
point mass ``q = onehot(d)``.

Rows of a batch advance independently (each row accepts its own number of tokens); the output is
laid out as ``model.generate`` lays out greedy / sampled output (finished rows padded).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode import ops
from fastdecode.hf.options import Options
from fastdecode.speculation import accepted_prefix


class Verifier:
    """Turns the target's logits over ``[last, d_1 .. d_k]`` into each row's accepted tokens.

    opts: the call's options (do_sample and the warp); generator: random source of sampling.
    """

    def __init__(self, opts: Options, backend: str, generator: Optional[torch.Generator] = None):
        self.do_sample = opts.do_sample
        top_p = min(opts.top_p, 1.0) if opts.top_p > 0 else torch.finfo(torch.float32).tiny
        self.warp = dict(temperature=opts.temperature, top_k=max(opts.top_k, 0), top_p=top_p,
                         min_p=opts.min_p)
        self.backend = backend
        self.generator = generator

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [N, V] float32 -> [N, V] float32 probabilities after the call's warp."""
        scores = ops.process_logits(logits, **self.warp, backend=self.backend)
        return scores.softmax(-1)

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [B, V] float32 (the prefill's) -> [B] int64, the first new token of each row."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.probabilities(logits), 1, generator=self.generator)[:, 0]

    def __call__(self, logits: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor,
                 draft_probs: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [B, K + 1, V] float32, the target's logits after ``last, d_1 .. d_K``;
        drafts: [B, K] int64 (columns past a row's length are ignored); lengths: [B] int64 draft
        tokens of each row; draft_probs: [B, K, V] float32 the drafter's distributions (None: a
        deterministic drafter).

        Returns (accepted [B] int64 number of draft tokens kept, next [B] int64 the token after
        them: the target's correction at the first rejection, or its bonus token).
        """
        batch, width = drafts.shape
        valid = torch.arange(width, device=drafts.device)[None, :] < lengths[:, None]
        safe = torch.where(valid, drafts, 0)
        if not self.do_sample:
            return accepted_prefix(logits.argmax(-1), safe, lengths)
        vocab = logits.shape[-1]
        p = self.probabilities(logits.flatten(0, 1)).view(batch, width + 1, vocab)
        q = (torch.nn.functional.one_hot(safe, vocab).float() if draft_probs is None
             else draft_probs)
        p_d = p[:, :width].gather(2, safe[..., None])[..., 0]
        q_d = q.gather(2, safe[..., None])[..., 0]
        draw = torch.rand(p_d.shape, generator=self.generator, device=p_d.device)
        # q_d > 0 for every token the drafter proposed; p_d / q_d >= 1 always keeps the token.
        kept = (draw * q_d <= p_d) & valid
        accepted = kept.int().cumprod(1).sum(1)
        target = p.gather(1, accepted[:, None, None].expand(-1, 1, vocab))[:, 0]
        rejected = accepted < lengths
        if bool(rejected.any()):
            row_q = q.gather(1, accepted.clamp(max=width - 1)[:, None, None].expand(-1, 1, vocab))
            residual = (target - row_q[:, 0]).clamp(min=0)
            total = residual.sum(-1, keepdim=True)
            # A rejection means p(d) < q(d) somewhere, so the residual has mass; guard rounding.
            use = rejected[:, None] & (total > torch.finfo(torch.float32).tiny)
            target = torch.where(use, residual / total.clamp(min=1e-30), target)
        return accepted, torch.multinomial(target, 1, generator=self.generator)[:, 0]


def run(target, drafter, verifier: Verifier, opts: Options, input_ids: torch.Tensor,
        mask: torch.Tensor) -> torch.Tensor:
    """Speculative decoding of the B rows of ``input_ids`` [B, L] (left-padded, ``mask`` [B, L])
    on ``target`` (a :class:`~fastdecode.hf.steppers.PagedStepper`) -> sequences [B, L + new]."""
    batch, length = input_ids.shape
    eos = set(opts.eos or ())
    limit = opts.max_new_tokens
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
    new: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch

    def take(row: int, tokens: list[int]) -> None:
        for token in tokens[:limit - len(new[row])]:
            new[row].append(token)
            if token in eos:
                break
        done[row] = new[row][-1] in eos or len(new[row]) >= limit

    first = verifier.first(_ban_eos(target.prefill()[:, None], torch.full(
        (batch,), length), opts)[:, 0]).tolist()
    drafter.start(first)
    for row, token in enumerate(first):
        take(row, [token])
    while not all(done):
        # Drafts never reach past max_new_tokens: the target adds one token after them.
        room = min(limit - len(n) - 1 for n, stop in zip(new, done) if not stop)
        drafts, lengths, probs = drafter.propose(
            [p + n for p, n in zip(prompts, new)], room, done)
        drafts, lengths = drafts.to(target.device), lengths.to(target.device)
        logits = _verify(target, [n[-1] for n in new], drafts, lengths)
        produced = torch.tensor([length + len(n) for n in new])
        accepted, following = verifier(_ban_eos(logits, produced, opts), drafts, lengths,
                                       probs if probs is None else probs.to(target.device))
        finished = torch.tensor(done, device=accepted.device)
        # Finished rows forget the whole round; the others their rejected drafts.
        target.rewind(torch.where(finished, lengths + 1, lengths - accepted))
        drafter.accept(accepted, following, done)
        kept, nxt = accepted.tolist(), following.tolist()
        for row in range(batch):
            if not done[row]:
                take(row, drafts[row, :kept[row]].tolist() + [nxt[row]])
    return _layout(input_ids, new, opts.pad if opts.pad is not None else 0)


def _verify(target, last: list[int], drafts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One packed forward of ``last[b], drafts[b, :lengths[b]]`` for every row b -> the target's
    logits after each of them, [B, K + 1, V] float32 (columns past a row's drafts repeat its
    last logits; the verifier ignores them)."""
    counts = (lengths + 1).tolist()
    first = torch.tensor(last, device=drafts.device)
    tokens = torch.cat([torch.cat([first[b:b + 1], drafts[b, :counts[b] - 1]])
                        for b in range(len(last))])
    logits = target.extend(tokens, counts, every_logit=True)  # [T, V]
    starts = torch.tensor(counts, device=drafts.device).cumsum(0) - lengths - 1
    columns = torch.arange(drafts.shape[1] + 1, device=drafts.device)
    return logits[starts[:, None] + torch.minimum(columns[None, :], lengths[:, None])]


def _ban_eos(logits: torch.Tensor, produced: torch.Tensor, opts: Options) -> torch.Tensor:
    """logits: [B, C, V] float32 for C successive tokens of each row; produced: [B] sequence
    length (with padding, as HF counts it) before the first of them. EOS gets -inf where the
    length is still below min_length (EOS ids outside the vocabulary are ignored, as in HF)."""
    if not opts.eos or opts.min_length <= int(produced.min()):
        return logits
    vocab = logits.shape[-1]
    eos = torch.tensor([e for e in opts.eos if 0 <= e < vocab], dtype=torch.long)
    columns = torch.arange(logits.shape[1])
    banned = (produced[:, None] + columns[None, :] < opts.min_length).to(logits.device)
    mask = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
    mask[eos.to(logits.device)] = True
    return logits.masked_fill(banned[..., None] & mask, float("-inf"))


def _layout(input_ids: torch.Tensor, new: list[list[int]], pad: int) -> torch.Tensor:
    """[B, L] and B ragged lists of new tokens -> [B, L + longest], shorter rows padded."""
    width = max(len(n) for n in new)
    out = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype)
    for row, tokens in enumerate(new):
        out[row, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
