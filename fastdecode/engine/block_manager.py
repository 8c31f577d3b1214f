"""KV-cache block allocation: a free list, reference counts, copy-on-write of shared blocks and
a prefix cache of full blocks.

A sequence's *block table* is a plain ``list[int]`` of block ids (token ``i`` lives in
``table[i // block_size]``). Sequences forked from one prompt share its blocks (reference count
> 1); the first write into a shared block copies it, so no sequence ever sees another's tokens.
Copies are returned as ``(src, dst)`` pairs for the model runner to apply to every layer's cache
before the step's forward pass.

Prefix caching (``enable_caching``): a block whose ``block_size`` tokens all have their keys and
values computed is registered under a hash chain of the tokens up to its end (block ``i``'s hash
covers tokens ``[0, (i + 1) * block_size)``, so equal hashes mean equal prefixes). A new
sequence whose first blocks hash the same takes those blocks by reference instead of computing
them again. A registered block nobody holds stays cached; it is reused for another content only
when no plain free block is left, least recently freed first.

Blocks that the step being scheduled will fill are *expected* (:meth:`expect`): a request
admitted later in the same step may take them too, since a layer appends every new key and value
of the step before any attention of that layer reads the cache. Expectations last until the next
``clear_expected()`` (the next schedule), when the step's results have registered the blocks for
good. No torch here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Owns blocks ``0 .. num_blocks - 1``.

    ``watermark`` (a fraction of the cache) is kept free when admitting new sequences, so that
    running sequences can grow for a while before anything has to be preempted. Free blocks
    (``num_free_blocks``) include the cached blocks nobody holds: they can be taken at any time.
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0,
                 enable_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))  # holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._expected: dict[bytes, int] = {}  # filled by the step being scheduled
        self._expected_hash: dict[int, bytes] = {}
        self.num_queried_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.num_hit_tokens = 0      # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or not."""
        return len(self._hash_of)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    @property
    def num_used_blocks(self) -> int:
        """Blocks some table holds."""
        return self.num_blocks - self.num_free_blocks

    def grow(self, num_blocks: int) -> None:
        """Own blocks ``0 .. num_blocks - 1`` from now on (the new ones free); never shrinks."""
        if num_blocks > self.num_blocks:
            self._free.extend(range(self.num_blocks, num_blocks))
            self._refs.extend([0] * (num_blocks - self.num_blocks))
            self.num_blocks = num_blocks

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    # ------------------------------------------------------------------ allocation
    def blocks_needed(self, table: list[int], num_computed: int, num_new: int) -> int:
        """Free blocks that appending ``num_new`` tokens after ``num_computed`` would take."""
        grow = max(0, cdiv(num_computed + num_new, self.block_size) - len(table))
        first = num_computed // self.block_size
        cow = sum(1 for b in table[first:] if self._refs[b] > 1)
        return grow + cow

    def admissible_tokens(self, reserved: int = 0, watermark: bool = True) -> int:
        """How many tokens a new sequence may take now, leaving ``reserved`` blocks and (unless
        ``watermark`` is False) the watermark free."""
        spare = self.num_free_blocks - self.watermark_blocks * watermark - reserved
        return max(0, spare) * self.block_size

    def can_allocate(self, num_tokens: int, reserved: int = 0) -> bool:
        """Whether a new sequence's next ``num_tokens`` (from a block boundary) fit, leaving the
        watermark and ``reserved`` blocks free."""
        return num_tokens <= self.admissible_tokens(reserved)

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

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Keep the blocks of tokens ``[0, num_tokens)``: those past them (filled with rejected
        speculative drafts) are freed."""
        keep = cdiv(num_tokens, self.block_size)
        self.free(table[keep:])
        del table[keep:]

    def fork(self, table: list[int]) -> list[int]:
        """A child table sharing every block of ``table`` (e.g. for parallel samples)."""
        for b in table:
            self._refs[b] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop the table's references. Blocks nobody else holds become free; cached ones stay
        cached until reused, the table's last blocks first (they are the least shared)."""
        for b in reversed(table):
            # Only a block's writer frees it while a step is scheduled (a preempted request):
            # it will not be filled.
            self._forget_expected(b)
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        table.clear()

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:  # evict the least recently freed cached block
            b, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(b)]
        self._refs[b] = 1
        return b

    # ------------------------------------------------------------------ prefix cache
    def hash_blocks(self, token_ids: list[int], hashes: list[bytes], seed: bytes = b"") -> None:
        """Extend ``hashes`` (in place) to one hash per full block of ``token_ids``; each
        chains its predecessor's, the first chains ``seed`` (what else the keys and values
        depend on: an encoder-decoder request's encoder input). No-op with caching off."""
        if not self.enable_caching:
            return
        size = self.block_size
        for i in range(len(hashes), len(token_ids) // size):
            h = hashlib.blake2b(hashes[-1] if hashes else seed, digest_size=16)
            h.update(array("q", token_ids[i * size:(i + 1) * size]).tobytes())
            hashes.append(h.digest())

    def lookup(self, hashes: list[bytes], max_blocks: int) -> list[int]:
        """The cached (or expected) blocks holding the longest run of ``hashes[:max_blocks]``
        from the start."""
        found = []
        for h in hashes[:max(0, max_blocks)]:
            b = self._block_of.get(h, self._expected.get(h))
            if b is None:
                break
            found.append(b)
        return found

    def expect(self, table: list[int], hashes: list[bytes], num_cached: int,
               num_tokens: int) -> None:
        """The step being scheduled fills the table's blocks up to ``num_tokens // block_size``:
        offer those not cached yet to the requests admitted after it in the same step."""
        if not self.enable_caching:
            return
        for i in range(num_cached, min(num_tokens // self.block_size, len(hashes), len(table))):
            b, h = table[i], hashes[i]
            if b not in self._hash_of and h not in self._block_of and h not in self._expected:
                self._expected[h] = b
                self._expected_hash[b] = h

    def is_expected(self, block: int) -> bool:
        return block in self._expected_hash

    def clear_expected(self) -> None:
        """A new step is scheduled: the last step's blocks are registered or were not filled."""
        self._expected.clear()
        self._expected_hash.clear()

    def _forget_expected(self, block: int) -> None:
        h = self._expected_hash.pop(block, None)
        if h is not None:
            del self._expected[h]

    def unheld(self, blocks: list[int]) -> int:
        """How many of ``blocks`` nobody holds: taking them uses up that many free blocks."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def share(self, table: list[int], blocks: list[int], num_queried_tokens: int) -> None:
        """Start the empty ``table`` of a sequence with ``num_queried_tokens`` tokens with the
        cached or expected ``blocks`` (from :meth:`lookup`), by reference; counts the hit
        rate."""
        assert not table, "share() starts a new table"
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        table.extend(blocks)
        if self.enable_caching:
            self.num_queried_tokens += num_queried_tokens
            self.num_hit_tokens += len(blocks) * self.block_size

    def cache_blocks(self, table: list[int], hashes: list[bytes], num_cached: int,
                     num_computed: int) -> int:
        """Register the table's blocks ``[num_cached, num_computed // block_size)`` (full, their
        keys and values computed) in the prefix cache; returns the new count of blocks done.

        A block whose content another block already holds (two requests computed the same
        prefix at once) stays private and simply returns to the free list when released.
        """
        if not self.enable_caching:
            return num_cached
        done = min(num_computed // self.block_size, len(hashes), len(table))
        for i in range(num_cached, done):
            b, h = table[i], hashes[i]
            if b not in self._hash_of and h not in self._block_of:
                self._hash_of[b] = h
                self._block_of[h] = b
        return max(num_cached, done)
