"""Turns a scheduled batch into model inputs and per-step metadata, runs the model, samples.

Owns the KV cache: per layer [2, num_blocks, block_size, Hkv, D] in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.engine.scheduler import ScheduledBatch
from lowbit.engine.sequence import Sequence
from lowbit.layers.attention import AttentionMetadata
from lowbit.layers.sampler import Sampler, SamplingTensors


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, block_size: int):
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        self.block_size = block_size
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self._generators: dict[int, torch.Generator] = {}

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (2, num_blocks, self.block_size, self.cfg.num_key_value_heads, self.cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.cfg.num_hidden_layers)]

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int) -> int:
        """Peak bytes allocated by one prefill of `num_tokens` (no KV cache yet): the activation budget."""
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        meta = self._metadata([num_tokens], [num_tokens], [[]], slots=None, kv=False)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), meta)
        self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def _metadata(self, query_lens, seq_lens, block_tables, slots, kv=True) -> AttentionMetadata:
        dev = self.device
        width = max((len(b) for b in block_tables), default=0) or 1
        tables = torch.tensor([b + [0] * (width - len(b)) for b in block_tables] or [[0]], dtype=torch.int32)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        token_seq_lens = None
        if self.cfg.rope.type == "dynamic":
            token_seq_lens = torch.repeat_interleave(torch.tensor(seq_lens), torch.tensor(query_lens)).to(dev)
        return AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            slot_mapping=(torch.tensor(slots, dtype=torch.long) if slots is not None else torch.empty(0, dtype=torch.long)).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            kv_caches=self.kv_caches if kv else None,
            token_seq_lens=token_seq_lens,
        )

    def prepare(self, batch: ScheduledBatch):
        ids, positions, slots, seq_lens = [], [], [], []
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.query_lens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            seq_lens.append(start + n)
        meta = self._metadata(batch.query_lens, seq_lens, [s.block_table for s in batch.seqs], slots)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True)
        last = (meta.query_start_loc[1:] - 1).long()
        return ids_t, pos_t, meta, last

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [B, V] (float32) for the last new token of each sequence."""
        ids, positions, meta, last = self.prepare(batch)
        hidden = self.model(ids, positions, meta)
        return self.model.compute_logits(hidden[last]).float()

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        dev = self.device
        params = [s.params for s in seqs]
        penalize = any(p.repetition_penalty != 1.0 for p in params)
        seen = None
        if penalize:
            width = max(s.num_tokens for s in seqs)
            seen = torch.tensor([s.token_ids + [-1] * (width - s.num_tokens) for s in seqs], dtype=torch.long).to(dev)
        return SamplingTensors(
            temperatures=torch.tensor([p.temperature for p in params], dtype=torch.float32).to(dev),
            top_ks=torch.tensor([p.top_k for p in params], dtype=torch.long).to(dev),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32).to(dev),
            min_ps=torch.tensor([p.min_p for p in params], dtype=torch.float32).to(dev),
            repetition_penalties=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32).to(dev),
            seen_tokens=seen,
            generators=[self._generator(s) for s in seqs],
            all_greedy=all(p.greedy for p in params),
        )

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        g = self._generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seq.params.seed)
            self._generators[seq.seq_id] = g
        return g

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], suppress: list[list[int]]) -> list[int]:
        """`suppress[i]`: token ids row i may not produce yet (EOS before min_tokens)."""
        for i, ids in enumerate(suppress):
            if ids:
                logits[i, ids] = float("-inf")
        return self.sampler(logits, self.sampling_tensors(seqs)).tolist()
