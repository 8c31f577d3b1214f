"""KV-cache block allocation: a free list, reference counts, copy-on-write of shared blocks.

A sequence's *block table* is a plain ``list[int]`` of block ids (token ``i`` lives in
``table[i // block_size]``). Sequences forked from one prompt share its blocks (reference count
> 1); the first write into a shared block copies it, so no sequence ever sees another's tokens.
Copies are returned as ``(src, dst)`` pairs for the model runner to apply to every layer's cache
before the step's forward pass. No torch here.
"""

from __future__ import annotations

from collections import deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Owns blocks ``0 .. num_blocks - 1``.

    ``watermark`` (a fraction of the cache) is kept free when admitting new sequences, so that
    running sequences can grow for a while before anything has to be preempted.
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def blocks_needed(self, table: list[int], num_computed: int, num_new: int) -> int:
        """Free blocks that appending ``num_new`` tokens after ``num_computed`` would take."""
        grow = max(0, cdiv(num_computed + num_new, self.block_size) - len(table))
        first = num_computed // self.block_size
        cow = sum(1 for b in table[first:] if self._refs[b] > 1)
        return grow + cow

    def admissible_tokens(self) -> int:
        """How many tokens a new sequence may take now, leaving the watermark free."""
        return max(0, self.num_free_blocks - self.watermark_blocks) * self.block_size

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence's first ``num_tokens`` fit, leaving the watermark free."""
        return num_tokens <= self.admissible_tokens()

    def can_append(self, table: list[int], num_computed: int, num_new: int) -> bool:
        return self.blocks_needed(table, num_computed, num_new) <= self.num_free_blocks

    def append_slots(self, table: list[int], num_computed: int,
                     num_new: int) -> list[tuple[int, int]]:
        """Make ``table`` hold tokens ``[0, num_computed + num_new)`` with the new ones writable.

        Grows ``table`` in place and replaces any shared block the write touches by a private
        copy. Returns the ``(src, dst)`` block copies the runner must apply first.
        Raises RuntimeError when the blocks are not there (callers check ``can_append``).
        """
        if not self.can_append(table, num_computed, num_new):
            need = self.blocks_needed(table, num_computed, num_new)
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free_blocks} free")
        copies = []
        first = num_computed // self.block_size
        for i in range(first, len(table)):
            src = table[i]
            if self._refs[src] > 1:
                self._refs[src] -= 1
                table[i] = self._take()
                copies.append((src, table[i]))
        while len(table) < cdiv(num_computed + num_new, self.block_size):
            table.append(self._take())
        return copies

    def fork(self, table: list[int]) -> list[int]:
        """A child table sharing every block of ``table`` (e.g. for parallel samples)."""
        for b in table:
            self._refs[b] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop the table's references (blocks nobody else holds return to the free list)."""
        for b in table:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
        table.clear()

    def _take(self) -> int:
        b = self._free.popleft()
        self._refs[b] = 1
        return b
