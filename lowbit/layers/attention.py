"""Causal self-attention over a paged KV cache.

Tokens of all sequences in a step are packed along one axis T (no padding):
  q [T, Hq, D], k/v [T, Hkv, D]; sequence b owns tokens query_start_loc[b] : query_start_loc[b+1].
KV cache per layer: [2, num_blocks, block_size, Hkv, D]; token slot s lives at block s // block_size,
offset s % block_size. `block_tables[b]` lists the blocks of sequence b in order.
A query at position p sees keys at positions t <= p (and t > p - window with a sliding window).

The torch path below is the specification and the CPU path: it writes the new k/v into the cache,
then runs scaled_dot_product_attention per sequence (prefill) or batched over padded context (decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Per-step inputs, built by the engine's model runner and passed down explicitly."""

    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context length after this step (cached + new)
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    kv_caches: list[torch.Tensor] | None  # one per layer; None while profiling memory
    token_seq_lens: torch.Tensor | None = None  # [T] seq_lens per token (dynamic rope only)

    @property
    def is_decode(self) -> bool:
        return max(self.query_lens_cpu) == 1

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    n_heads, d = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, n_heads, d).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, n_heads, d).index_copy_(0, slot_mapping, v)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    # q_pos [..., Q, 1], k_pos [..., 1, L] -> bool [..., Q, L]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _sdpa(q, k, v, mask, scale):
    # q [B, Hq, Q, D], k/v [B, Hkv, L, D]; expand kv heads for grouped-query attention
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    if kv_cache is not None:
        write_kv_cache(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    if kv_cache is not None and meta.is_decode:
        _decode(q, kv_cache, meta, scale, window, out)
        return out
    starts = meta.query_start_loc.tolist()
    for b, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        s, e = starts[b], starts[b] + q_len
        if ctx == q_len or kv_cache is None:
            kb, vb = k[s:e], v[s:e]  # nothing cached before these tokens
        else:
            kb, vb = _gather(kv_cache, meta.block_tables[b], ctx)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = _visible(q_pos, k_pos, window)
        o = _sdpa(q[s:e].transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None], mask, scale)
        out[s:e] = o[0].transpose(0, 1)
    return out


def _gather(kv_cache: torch.Tensor, block_table: torch.Tensor, ctx: int):
    block_size = kv_cache.shape[2]
    blocks = block_table[: (ctx + block_size - 1) // block_size].long()
    kb = kv_cache[0, blocks].flatten(0, 1)[:ctx]
    vb = kv_cache[1, blocks].flatten(0, 1)[:ctx]
    return kb, vb


def _decode(q, kv_cache, meta, scale, window, out):
    # one query per sequence: gather every context into a padded [B, L] batch and mask the padding
    bsz, block_size = q.shape[0], kv_cache.shape[2]
    n_blocks = (meta.max_seq_len + block_size - 1) // block_size
    blocks = meta.block_tables[:, :n_blocks].long()
    kb = kv_cache[0, blocks].flatten(1, 2)  # [B, L, Hkv, D]
    vb = kv_cache[1, blocks].flatten(1, 2)
    k_pos = torch.arange(kb.shape[1], device=q.device)[None, None, :]  # [1, 1, L]
    q_pos = (meta.seq_lens.long() - 1)[:, None, None]  # [B, 1, 1]
    mask = _visible(q_pos, k_pos, window)[:, None]  # [B, 1, 1, L]
    o = _sdpa(q[:, :, None, :], kb.transpose(1, 2), vb.transpose(1, 2), mask, scale)
    out.copy_(o[:, :, 0, :].reshape(bsz, -1, q.shape[-1]))


class Attention(nn.Module):
    """Attention for one layer: writes k/v into its cache and attends over the cached context."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, layer_idx: int,
                 sliding_window: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale, self.layer_idx, self.sliding_window = scale, layer_idx, sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        kv_cache = meta.kv_caches[self.layer_idx] if meta.kv_caches is not None else None
        return attention_torch(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
