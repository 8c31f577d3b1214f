"""KV blocks of beam search: beams share their prompt's blocks through the engine's BlockManager
(fork, copy-on-write of the partial block), and the pool grows on demand."""

from __future__ import annotations

import pytest

from _beam_helpers import assert_beams_match
from _hf_helpers import padded_batch
from fastdecode.engine.block_manager import BlockManager, cdiv
from fastdecode.hf import beam_cache
from fastdecode.plan.attention import PagedKVCache
from tiny import tiny_model

BLOCK = 16  # the block size fastdecode.generate uses


def test_block_manager_grows_keeping_its_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    table: list[int] = []
    bm.append_slots(table, 0, 12)
    child = bm.fork(table)
    assert bm.num_free_blocks == 0 and bm.num_used_blocks == 3
    bm.grow(5)
    assert bm.num_blocks == 5 and bm.num_free_blocks == 2 and bm.ref_count(table[0]) == 2
    bm.append_slots(child, 12, 5)
    assert sorted(child[3:]) == [3, 4] and bm.num_free_blocks == 0
    bm.grow(4)  # never shrinks
    assert bm.num_blocks == 5


def _record_tables(monkeypatch) -> list:
    """Each step's (tables, blocks in use) right after the beams were reordered."""
    steps = []
    inner = beam_cache.BeamKV.reorder

    def reorder(self, parents):
        inner(self, parents)
        steps.append(([list(t) for t in self.tables], self.blocks_in_use, self.manager))

    monkeypatch.setattr(beam_cache.BeamKV, "reorder", reorder)
    return steps


@pytest.mark.parametrize("prompt_len", [512, 509])
def test_five_beams_hold_one_prompt_plus_their_tails(prompt_len, monkeypatch):
    model = tiny_model("llama", max_position_embeddings=1024)
    ids, mask = padded_batch([prompt_len], model.config.vocab_size, seed=4)
    steps = _record_tables(monkeypatch)
    new = 20
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, num_beams=5,
                       max_new_tokens=new, do_sample=False)
    assert len(steps) == new
    full = prompt_len // BLOCK  # full prompt blocks: never copied
    five_copies = 5 * cdiv(prompt_len + new, BLOCK)
    for tables, in_use, manager in steps:
        assert len({tuple(t[:full]) for t in tables}) == 1  # one prompt's worth, shared
        assert all(manager.ref_count(b) == 5 for b in tables[0][:full])
        tails = {b for t in tables for b in t[full:]}
        assert in_use == full + len(tails)  # nothing else is held
        # each beam's tail covers at most its own tokens since the shared prompt blocks
        assert all(len(t) - full <= cdiv(prompt_len + new - full * BLOCK, BLOCK) for t in tables)
    assert steps[-1][1] <= full + 5 * cdiv(prompt_len + new - full * BLOCK, BLOCK) < five_copies


def test_beams_copy_the_shared_partial_block_before_writing(monkeypatch):
    model = tiny_model("qwen2")
    ids, mask = padded_batch([21, 9], model.config.vocab_size, seed=6)
    copies = []
    inner = PagedKVCache.copy_blocks
    monkeypatch.setattr(PagedKVCache, "copy_blocks",
                        lambda self, c: (copies.append(list(c)), inner(self, c)))
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, num_beams=4,
                       max_new_tokens=6, do_sample=False)
    # The first decode writes into each prompt's partial last block, shared by its 4 beams:
    # three of them get a copy (the last one left holding it writes in place).
    assert len(copies[0]) == 2 * 3
