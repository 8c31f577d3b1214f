"""Forced words of constrained beam search: the user-facing constraint classes, their validation,
and the progress of a list of constraints as a batched automaton over token ids.

transformers 5 no longer ships ``PhrasalConstraint`` / ``DisjunctiveConstraint``; fastdecode
provides both (``fastdecode.PhrasalConstraint``, ``fastdecode.DisjunctiveConstraint``). Plain id
lists are accepted too, as ``force_words_ids`` takes them: ``[5, 6]`` is a phrase, ``[[5, 6],
[7]]`` one of several words. Objects of another library's classes of those names (the hub
repository's) are read through their ``token_ids``.

Progress follows transformers 4.5x's ``ConstraintListState``, replayed over a beam's whole row
(prompt and padding included): a token either advances the constraint in progress (else that
constraint restarts and goes to the back of the pending list, and the token is not tried
elsewhere) or, when none is in progress, starts the first pending constraint it begins. The
bank of a state is ``#complete * max_len + (max_len - remaining steps of the one in progress)``.
Each constraint is a trie of its words; the tries share one node numbering so that a state is a
few integer tensors: ``complete`` [..., C] bool, ``node`` [...] int64 (the trie node reached by
the constraint in progress, -1 if none), ``key`` [..., C] int64 (pending order) and ``tick``
[...] int64 (the next key).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BIG = 1 << 62


class PhrasalConstraint:
    """The output must contain ``token_ids`` (a non-empty list of token ids) in this order."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = _word(token_ids, "PhrasalConstraint token_ids")


class DisjunctiveConstraint:
    """The output must contain one of the words of ``nested_token_ids`` (non-empty lists of token
    ids, none a prefix of another)."""

    def __init__(self, nested_token_ids: list[list[int]]):
        name = "DisjunctiveConstraint nested_token_ids"
        if not isinstance(nested_token_ids, (list, tuple)) or not nested_token_ids:
            raise ValueError(f"{name} must be a non-empty list of token-id lists, got "
                             f"{nested_token_ids!r}")
        self.token_ids = [_word(w, name) for w in nested_token_ids]
        _Trie(self.token_ids, name)  # rejects a word that is a prefix of another


def _word(ids, name: str) -> list[int]:
    if (not isinstance(ids, (list, tuple)) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise ValueError(f"{name} must be non-empty lists of non-negative int token ids, got "
                         f"{ids!r}")
    return list(ids)


def parse(constraints, force_words_ids, vocab: int) -> list[list[list[int]]]:
    """``constraints`` then ``force_words_ids`` (4.5x's order) -> per constraint its words (one
    for a phrase). Raises ValueError naming the parameter for anything malformed."""
    out = []
    for name, items in (("constraints", constraints), ("force_words_ids", force_words_ids)):
        if items is None:
            continue
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"{name} must be a non-empty list, got {items!r}")
        for item in items:
            words = _words(item, name)
            for w in words:
                if max(w) >= vocab:
                    raise ValueError(f"{name}: token id {max(w)} is out of range [0, {vocab})")
            out.append(words)
    return out


def _words(item, name: str) -> list[list[int]]:
    kind = type(item).__name__
    if kind in ("PhrasalConstraint", "DisjunctiveConstraint") and hasattr(item, "token_ids"):
        item = item.token_ids
    elif not isinstance(item, (list, tuple)):
        raise ValueError(f"{name}: unsupported constraint {kind}; pass fastdecode."
                         "PhrasalConstraint / DisjunctiveConstraint or token-id lists")
    if item and all(isinstance(w, (list, tuple)) for w in item):
        words = [_word(w, name) for w in item]
        _Trie(words, name)
        return words
    return [_word(item, f"{name} entries")]


class _Trie:
    """Nodes of one constraint's words: children (token -> node, in insertion order), depth."""

    def __init__(self, words: list[list[int]], name: str):
        self.children: list[dict[int, int]] = [{}]
        self.depth = [0]
        for word in words:
            node = 0
            for t in word:
                if t not in self.children[node]:
                    self.children[node][t] = len(self.children)
                    self.children.append({})
                    self.depth.append(self.depth[node] + 1)
                node = self.children[node][t]
        leaves = sum(not c for c in self.children)
        if leaves != len(words):
            raise ValueError(f"{name}: no word of a disjunctive constraint may be a prefix of (or "
                             f"equal to) another, got {words!r}")


@dataclass
class State:
    """Progress of beams through the constraint list (leading dims [...]; see the module)."""

    complete: torch.Tensor
    node: torch.Tensor
    key: torch.Tensor
    tick: torch.Tensor

    def take(self, index: torch.Tensor) -> "State":
        """[B, M, ...] states, index [B, N] -> [B, N, ...] (state[b, index[b, n]])."""
        def pick(t):
            return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), 1)
        return State(pick(self.complete), pick(self.node), pick(self.key), pick(self.tick))

    def expand(self, k: int) -> "State":
        """[B, ...] states -> [B, k, ...], each repeated."""
        def rep(t):
            return t.unsqueeze(1).repeat_interleave(k, 1)
        return State(rep(self.complete), rep(self.node), rep(self.key), rep(self.tick))

    def done(self) -> torch.Tensor:
        """[...] bool: every constraint is complete."""
        return self.complete.all(-1)


class Constraints:
    """The tries of C constraints as tables on ``device``: ``tok`` / ``nxt`` [N, F] child tokens
    (-1 padding) and child nodes, ``leaf`` / ``owner`` / ``bank_add`` [N], ``roots`` [C]."""

    def __init__(self, constraints: list[list[list[int]]], device):
        tries = [_Trie(words, "constraints") for words in constraints]
        lengths = [max(len(w) for w in words) for words in constraints]
        self.max_len = max(lengths)
        self.count = len(tries)
        fan = max(len(c) for t in tries for c in t.children)
        tok, nxt, leaf, owner, bank, roots = [], [], [], [], [], []
        for c, trie in enumerate(tries):
            base = len(tok)
            roots.append(base)
            for node, children in enumerate(trie.children):
                pad = fan - len(children)
                tok.append(list(children) + [-1] * pad)
                nxt.append([base + n for n in children.values()] + [0] * pad)
                leaf.append(not children)
                owner.append(c)
                bank.append(self.max_len - lengths[c] + trie.depth[node])
        as_long = dict(dtype=torch.int64, device=device)
        self.tok, self.nxt = torch.tensor(tok, **as_long), torch.tensor(nxt, **as_long)
        self.leaf = torch.tensor(leaf, dtype=torch.bool, device=device)
        self.owner, self.bank_add = torch.tensor(owner, **as_long), torch.tensor(bank, **as_long)
        self.roots = torch.tensor(roots, **as_long)

    def start(self, ids: torch.Tensor) -> State:
        """ids: [B, L] int64 rows (padding included, as 4.5x replayed them) -> states [B]."""
        batch, dev = ids.shape[0], ids.device
        state = State(torch.zeros(batch, self.count, dtype=torch.bool, device=dev),
                      torch.full((batch,), -1, dtype=torch.int64, device=dev),
                      torch.arange(self.count, device=dev).repeat(batch, 1),
                      torch.full((batch,), self.count, dtype=torch.int64, device=dev))
        for column in ids.unbind(1):
            state = self.step(state, column)
        return state

    def step(self, s: State, token: torch.Tensor) -> State:
        """States [...] after one more token each (token: [...] int64)."""
        inprog = s.node >= 0
        node = s.node.clamp(min=0)
        hit = self.tok[node] == token[..., None]  # [..., F]
        moved = inprog & hit.any(-1)
        child = (self.nxt[node] * hit).sum(-1)
        root_hit = self.tok[self.roots] == token[..., None, None]  # [..., C, F]
        starts = root_hit.any(-1) & ~s.complete
        first = torch.where(starts, s.key, _BIG).argmin(-1, keepdim=True)
        started = ~inprog & starts.any(-1)
        root_child = (self.nxt[self.roots] * root_hit).sum(-1).gather(-1, first)[..., 0]
        new = torch.where(inprog, child, root_child)
        owner = torch.where(inprog, self.owner[node], first[..., 0])
        mine = torch.nn.functional.one_hot(owner, self.count).bool()
        progressed = moved | started
        finished = progressed & self.leaf[new]
        reset = inprog & ~moved
        return State(s.complete | (mine & finished[..., None]),
                     torch.where(progressed & ~finished, new, -1),
                     torch.where(mine & reset[..., None], s.tick[..., None], s.key),
                     s.tick + reset.long())

    def bank(self, s: State) -> torch.Tensor:
        """[...] int64: 4.5x's bank of each state."""
        partial = torch.where(s.node >= 0, self.bank_add[s.node.clamp(min=0)], 0)
        return s.complete.sum(-1) * self.max_len + partial

    def advance(self, s: State) -> torch.Tensor:
        """[..., C * F] int64: the tokens that make progress (4.5x's ``advance()``: the children
        of the node in progress, else the first tokens of the pending constraints in pending
        order), -1 padded."""
        order = torch.where(s.complete, _BIG, s.key).argsort(-1)
        pending = (~s.complete).gather(-1, order)
        fresh = torch.where(pending[..., None], self.tok[self.roots][order], -1).flatten(-2)
        going = self.tok[s.node.clamp(min=0)]
        going = torch.cat([going, going.new_full((*going.shape[:-1], fresh.shape[-1]
                                                  - going.shape[-1]), -1)], -1)
        return torch.where((s.node >= 0)[..., None], going, fresh)
