"""Paged KV-cache bookkeeping: a free list of fixed-size blocks and each sequence's block table."""

from __future__ import annotations

from collections import deque

from lowbit.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_to_grow(self, seq: Sequence, new_tokens: int) -> int:
        total = seq.num_computed_tokens + new_tokens
        return max(0, (total + self.block_size - 1) // self.block_size - len(seq.block_table))

    def can_grow(self, seq: Sequence, new_tokens: int) -> bool:
        return self.blocks_to_grow(seq, new_tokens) <= len(self.free)

    def grow(self, seq: Sequence, new_tokens: int) -> None:
        """Make room for `new_tokens` more tokens after the ones already cached."""
        for _ in range(self.blocks_to_grow(seq, new_tokens)):
            seq.block_table.append(self.free.popleft())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
