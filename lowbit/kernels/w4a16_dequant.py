"""w4a16 "dequant" path (large M): W dequantized to x.dtype, N-chunk by N-chunk, then cuBLAS into those columns of y.

w4a16_dequant_kernel writes W[n, kernel column c] in the output dtype (<= DEQUANT_CHUNK_ELEMS elements, or the
config's "chunks", at a time into a reused buffer); with "overlap" a side stream dequantizes chunk i + 1 while
cuBLAS multiplies chunk i (two buffers, event-ordered). act-order multiplies x gathered into kernel column order
(w4a16_layout.py). Picked per M bucket by w4a16_tune.py where it measures faster than the fused kernels.
At M = 4096 (H100, seventh session, 16 sweep shapes, interleaved with cuBLAS bf16): 2 / 4 / 8 chunks, with and without
overlap, against one chunk: within the run-to-run spread (the same one-chunk call timed twice in that run differed by
up to 8%), one chunk at 0.88-1.01x bf16; the dequant pass itself is ~7% of the cuBLAS time there.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from lowbit.kernels.fp8_gemm import side_streams
from lowbit.kernels.w4a16 import _group_consts, _unpack_group
from lowbit.kernels.w4a16_layout import W4A16Weights
from lowbit.kernels.w4a16_tune import interpreting


@triton.jit
def w4a16_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_n, K_out, stride_on,
                         BITS: tl.constexpr, W: tl.constexpr, GS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                         USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n, c] = W[n, kernel column c] in out's dtype for c < K_out, one group-wide tile (>= 64 B a row) per store."""
    P: tl.constexpr = 32 // BITS
    KB: tl.constexpr = P * W
    CPG: tl.constexpr = P if (GS == 0 or GS >= KB) else GS // W
    DT: tl.constexpr = out_ptr.dtype.element_ty
    kb = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nc = tl.minimum(offs_n, N - 1)
    offs_w = tl.arange(0, W)
    offs_g = tl.arange(0, CPG * W)
    q = tl.load(qw_ptr + kb.to(tl.int64) * stride_n * W + offs_nc[:, None] * W + offs_w[None, :])
    out_rows = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on
    for gi in tl.static_range(P // CPG):
        c0 = kb * KB + gi * CPG * W
        s, ce, co = _group_consts(s_ptr, z_ptr, c0 // GS if GS > 0 else 0, stride_n, offs_n, N, BITS, HAS_ZEROS,
                                  USE_ASM, DT, BLOCK_N)
        a = _unpack_group(q, ce, co, s, gi * CPG // 2, CPG, BITS, USE_ASM, True, DT)  # [BN, CPG * W]
        cols = c0 + offs_g
        tl.store(out_rows + cols[None, :], a, mask=(offs_n < N)[:, None] & (cols < K_out)[None, :])


def w4a16_dequantize(w: W4A16Weights, dtype: torch.dtype, rows: tuple[int, int] | None = None,
                     kernel_order: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """W[n0:n1] in dtype: [rows, K] canonical column order, or with kernel_order [rows, Kp] (act-order: the
    columns sorted by group, see w4a16_layout.py) which is what the dequant + cuBLAS path multiplies (into out)."""
    n0, n1 = rows or (0, w.n)
    k_out = w.k_pad if w.perm is not None else w.k
    if out is None:
        out = torch.empty((n1 - n0, k_out), dtype=dtype, device=w.qweight.device)
    block_n = 64
    grid = (triton.cdiv(n1 - n0, block_n), w.k_pad // w.block_k)
    # a row range is a pointer offset: qweight [blocks, N, W] and scales [groups, N] keep their N strides
    w4a16_dequant_kernel[grid](
        w.qweight[:, n0:], w.scales[:, n0:], w.zeros[:, n0:] if w.zeros is not None else w.scales, out, n1 - n0,
        w.n, k_out, out.stride(0), BITS=w.bits, W=w.words, GS=w.gk, HAS_ZEROS=w.zeros is not None,
        USE_ASM=w.bits == 4 and not interpreting(), BLOCK_N=block_n, num_warps=4)
    if w.perm is None or kernel_order:
        return out
    keep = w.perm >= 0
    canonical = torch.empty((n1 - n0, w.k), dtype=dtype, device=out.device)
    canonical[:, w.perm[keep].long()] = out[:, keep]
    return canonical


DEQUANT_CHUNK_ELEMS = 1 << 28  # 512 MB of 16-bit weights at a time: bounded workspace for big layers


def dequant_matmul(x2: torch.Tensor, w: W4A16Weights, bias: torch.Tensor | None, chunks: int = 1,
                    overlap: bool = False) -> torch.Tensor:
    """Large M: W in x.dtype, N-chunk by N-chunk into a reused buffer, then cuBLAS into those columns of y. With
    overlap a side stream dequantizes chunk i + 1 while cuBLAS multiplies chunk i (two buffers, event-ordered)."""
    y = torch.empty((x2.shape[0], w.n), dtype=x2.dtype, device=x2.device)
    if w.perm is not None:  # act-order: x columns in kernel order, padding columns read a zero column
        x2 = torch.nn.functional.pad(x2, (0, 1))[:, torch.where(w.perm >= 0, w.perm, w.k)]
    chunks = max(chunks, -(-w.n * w.k // DEQUANT_CHUNK_ELEMS))
    rows = -(-w.n // chunks // 256) * 256  # even chunks of whole 256-row tiles: cuBLAS-friendly N
    starts = range(0, w.n, rows)
    overlap = overlap and len(starts) > 1 and x2.is_cuda
    bufs = [torch.empty((min(rows, w.n), x2.shape[1]), dtype=x2.dtype, device=x2.device) for _ in range(1 + overlap)]
    main = torch.cuda.current_stream(x2.device) if overlap else None
    side = side_streams(x2.device, 1)[0] if overlap else None
    if overlap:
        side.wait_stream(main)  # x, y and the buffers are ready
    freed = [None, None]  # per buffer: cuBLAS is done reading it
    for i, n0 in enumerate(starts):
        n1 = min(w.n, n0 + rows)
        wd = bufs[i % len(bufs)][: n1 - n0]  # [n1 - n0, K or Kp]
        with torch.cuda.stream(side) if overlap else contextlib.nullcontext():
            if freed[i % 2] is not None:
                side.wait_event(freed[i % 2])
            w4a16_dequantize(w, x2.dtype, (n0, n1), kernel_order=True, out=wd)
        if overlap:  # the last chunk's wait also joins the side stream back
            main.wait_event(side.record_event())
        out = y if n1 - n0 == w.n else y[:, n0:n1]  # a column slice: cuBLAS writes it with ldc = N
        if bias is not None:
            torch.addmm(bias[n0:n1].to(x2.dtype), x2, wd.t(), out=out)
        else:
            torch.mm(x2, wd.t(), out=out)
        if overlap:
            freed[i % 2] = main.record_event()
    return y


