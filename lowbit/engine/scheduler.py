"""Continuous batching: each step is either a prefill of waiting prompts or one decode step of all
running sequences. When the cache runs out during decode, the newest running sequence is preempted
(its blocks freed; it is recomputed from its tokens when it is scheduled again)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    query_lens: list[int]  # new tokens per sequence this step
    is_prefill: bool


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        seqs, lens, budget = [], [], self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(seqs) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - seq.num_computed_tokens
            if seqs and n > budget:
                break
            if not self.blocks.can_grow(seq, n):
                if not self.running and not seqs:
                    raise RuntimeError(
                        f"a {seq.num_tokens}-token sequence does not fit in the whole KV cache "
                        f"({self.blocks.num_blocks} blocks of {self.blocks.block_size}); give the cache more memory"
                    )
                break
            self.waiting.popleft()
            self.blocks.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            seqs.append(seq)
            lens.append(n)
            budget -= n
        self.running.extend(seqs)
        return ScheduledBatch(seqs, lens, True)

    def _schedule_decode(self) -> ScheduledBatch:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below while making room
                continue
            while not self.blocks.can_grow(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.grow(seq, 1)
                scheduled.append(seq)
        return ScheduledBatch(scheduled, [1] * len(scheduled), False)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED
