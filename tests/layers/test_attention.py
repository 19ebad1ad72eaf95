"""Paged attention (torch path) against dense causal attention computed from scratch."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.layers.attention import AttentionMetadata, attention_torch

HQ, HKV, D, BS = 4, 2, 8, 4


def dense(q, k, v, window=None):
    """q [Q, HQ, D] are the last Q positions of a context with k/v [L, HKV, D]."""
    qn, ln = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HQ // HKV, 1)
    v = v.repeat_interleave(HQ // HKV, 1)
    scores = torch.einsum("qhd,lhd->hql", q, k) / math.sqrt(D)
    qpos = torch.arange(ln - qn, ln)[:, None]
    kpos = torch.arange(ln)[None]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v)


def run(ctx_lens, q_lens, window=None, seed=0):
    """Sequences whose first ctx-q tokens are already cached; the last q tokens are new this step."""
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(math.ceil(c / BS) for c in ctx_lens) + 3
    cache = torch.zeros(2, nblocks, BS, HKV, D)
    perm = torch.randperm(nblocks, generator=g).tolist()  # blocks scattered through the cache
    tables, qs, ks, vs, slots, full = [], [], [], [], [], []
    for c, n in zip(ctx_lens, q_lens):
        blocks = [perm.pop() for _ in range(math.ceil(c / BS))]
        tables.append(blocks)
        k, v, q = torch.randn(c, HKV, D, generator=g), torch.randn(c, HKV, D, generator=g), torch.randn(n, HQ, D, generator=g)
        for p in range(c - n):  # pre-fill the cached prefix
            cache[0, blocks[p // BS], p % BS], cache[1, blocks[p // BS], p % BS] = k[p], v[p]
        slots += [blocks[p // BS] * BS + p % BS for p in range(c - n, c)]
        qs.append(q), ks.append(k[c - n:]), vs.append(v[c - n:]), full.append((q, k, v))
    width = max(len(t) for t in tables)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_lens_cpu=list(q_lens), seq_lens_cpu=list(ctx_lens), kv_caches=[cache])
    out = attention_torch(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, meta, 1 / math.sqrt(D), window)
    want = torch.cat([dense(q, k, v, window) for q, k, v in full])
    return out, want, cache, full, tables


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_batch(window):
    out, want, *_ = run([5, 9, 1], [5, 9, 1], window)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_after_cached_prefix(window):
    out, want, *_ = run([11, 7], [3, 7], window)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("window", [None, 4])
def test_decode_batch(window):
    out, want, *_ = run([13, 1, 8, 4], [1, 1, 1, 1], window)
    torch.testing.assert_close(out, want)


def test_new_tokens_land_in_their_slots():
    _, _, cache, full, tables = run([6], [6])
    q, k, v = full[0]
    for p in range(6):
        assert torch.equal(cache[0, tables[0][p // BS], p % BS], k[p])
        assert torch.equal(cache[1, tables[0][p // BS], p % BS], v[p])
