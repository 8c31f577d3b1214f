"""KV block manager: allocation at block boundaries, reference counts, fork + copy-on-write,
freeing, watermark. Pure Python: the engine's bookkeeping modules never import torch."""

from __future__ import annotations

import ast
import pathlib

import pytest

from fastdecode.engine.block_manager import BlockManager, cdiv

ENGINE = pathlib.Path(__file__).resolve().parents[1] / "fastdecode" / "engine"


@pytest.mark.parametrize("module", ["sequence.py", "block_manager.py", "scheduler.py", "params.py"])
def test_bookkeeping_modules_do_not_import_torch(module):
    tree = ast.parse((ENGINE / module).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in names if m.split(".")[0] == "torch"]
    # and none of the engine modules they import does either
    for m in names:
        if m.startswith("fastdecode.engine."):
            assert m.rsplit(".", 1)[1] + ".py" in {"sequence.py", "block_manager.py",
                                                    "scheduler.py", "params.py"}


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_append_allocates_exactly_the_blocks_needed(block_size, delta):
    bm = BlockManager(num_blocks=40, block_size=block_size)
    table: list[int] = []
    n = max(1, 2 * block_size + delta)
    assert bm.blocks_needed(table, 0, n) == cdiv(n, block_size)
    assert bm.append_slots(table, 0, n) == []
    assert len(table) == cdiv(n, block_size) and len(set(table)) == len(table)
    assert bm.num_free_blocks == 40 - len(table)
    # one more token needs a block only when the last one is full
    assert bm.blocks_needed(table, n, 1) == (1 if n % block_size == 0 else 0)
    bm.append_slots(table, n, 1)
    assert len(table) == cdiv(n + 1, block_size)
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 40


def test_out_of_blocks_is_reported_not_half_done():
    bm = BlockManager(num_blocks=3, block_size=4)
    a: list[int] = []
    bm.append_slots(a, 0, 9)  # 3 blocks
    b: list[int] = []
    assert not bm.can_append(b, 0, 1)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.append_slots(b, 0, 1)
    assert b == [] and bm.num_free_blocks == 0
    bm.free(a)
    assert bm.can_append(b, 0, 12) and not bm.can_append(b, 0, 13)


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent: list[int] = []
    bm.append_slots(parent, 0, 6)  # blocks [full, partial (2 of 4 used)]
    child = bm.fork(parent)
    assert child == parent and all(bm.ref_count(b) == 2 for b in parent)
    free0 = bm.num_free_blocks
    # the parent writes token 6 into the shared partial block: it gets a private copy
    assert bm.blocks_needed(parent, 6, 1) == 1
    copies = bm.append_slots(parent, 6, 1)
    assert copies == [(child[1], parent[1])] and parent[1] != child[1]
    assert parent[0] == child[0] and bm.ref_count(parent[0]) == 2
    assert bm.ref_count(child[1]) == 1 and bm.num_free_blocks == free0 - 1
    # the child is now the only owner of its partial block: it writes in place
    assert bm.append_slots(child, 6, 3) == [] and len(child) == 3
    bm.free(parent)
    assert bm.ref_count(child[0]) == 1  # still held by the child
    bm.free(child)
    assert bm.num_free_blocks == 10


def test_fork_at_a_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent: list[int] = []
    bm.append_slots(parent, 0, 8)
    child = bm.fork(parent)
    assert bm.blocks_needed(child, 8, 1) == 1
    assert bm.append_slots(child, 8, 1) == []  # a fresh block, the shared ones stay untouched
    assert child[:2] == parent and bm.ref_count(parent[1]) == 2
    for t in (parent, child):
        bm.free(t)
    assert bm.num_free_blocks == 10


def test_many_forks_copy_once_each_until_the_last_owner():
    bm = BlockManager(num_blocks=12, block_size=5)
    root: list[int] = []
    bm.append_slots(root, 0, 7)
    kids = [bm.fork(root) for _ in range(3)]
    assert bm.ref_count(root[1]) == 4
    for k in kids:
        assert len(bm.append_slots(k, 7, 1)) == 1
    assert bm.ref_count(root[1]) == 1
    assert bm.append_slots(root, 7, 1) == []  # the last owner writes in place
    for t in (root, *kids):
        bm.free(t)
    assert bm.num_free_blocks == 12


def test_watermark_applies_to_new_sequences_only():
    bm = BlockManager(num_blocks=100, block_size=2, watermark=0.05)  # 5 blocks kept back
    assert bm.admissible_tokens() == 190
    assert bm.can_allocate(190) and not bm.can_allocate(191)
    table: list[int] = []
    bm.append_slots(table, 0, 190)
    assert bm.admissible_tokens() == 0 and not bm.can_allocate(1)
    assert bm.can_append(table, 190, 10)  # a running sequence may dip into the watermark


@pytest.mark.parametrize("args", [(0, 16), (4, 0), (4, 16, 1.0), (4, 16, -0.1)])
def test_invalid_configuration(args):
    with pytest.raises(ValueError):
        BlockManager(*args)
