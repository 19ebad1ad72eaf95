"""w4a16 GEMM for large M (prefill): the same math and weight layout as w4a16.py, with TMA-fed operands.

    y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g(k)]) * s[n, g(k)]        (+ bias[n])

Why a second kernel: in w4a16_kernel the x tile [BM, KB] is a masked pointer load (the pipeliner keeps it
synchronous: registers -> shared memory every K-block) and the MMA is waited on right after its issue. Here x and
the packed weights arrive by TMA (tensor descriptors: zero-filled out of bounds, no masks, no clamps) with
STAGES tiles in flight and the weights are scaled before the MMA so the accumulator chains across K-blocks.
Measured on H100: 10-20% faster than w4a16_kernel at M = 128..512, still ~0.75x cuBLAS, because ptxas
serializes the register-operand wgmmas Triton emits (C7515); w4a16_wgmma.py (Gluon) is the fast sm90 path and
the tuned table keeps this kernel only where it measured fastest (or for GPUs without wgmma).

| tensor  | dtype          | shape              | notes                                                   |
|---------|----------------|--------------------|---------------------------------------------------------|
| x       | fp16 / bf16    | [M, K]             | any strides (copied to 16-byte aligned rows when needed) |
| qweight | int32          | [Kp/KB * N, W]     | w4a16_layout.py's [Kp/KB, N, W] seen as 2-D             |
| scales  | fp16/bf16/fp32 | [Kp/Gk, N]         | Gk a multiple of KB (128), or 0 (per-channel)            |
| zeros   | uint8          | [Kp/Gk, N]         | optional                                                |
| y       | x.dtype        | [M, N]             |                                                         |

SWAP = True keeps w4a16.py's orientation (acc^T [BN, BM] += W_tile @ x_tile^T: weights are the wgmma A
operand); SWAP = False computes acc [BM, BN] += x_tile @ W_tile^T (x is A, from shared memory, the unpacked
weights go to shared memory as B). 4-bit only; act-order weights take x gathered into kernel column order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lowbit.kernels.w4a16 import _group_consts, _unpack_group, grouped_tile
from lowbit.kernels.w4a16_layout import W4A16Weights
from lowbit.kernels.w4a16_tune import interpreting


@triton.jit
def w4a16_tma_kernel(x_desc, q_desc, s_ptr, z_ptr, bias_ptr, y_ptr, M, N, stride_ym, num_kb,
                     GS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
                     SWAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
                     W: tl.constexpr, STAGES: tl.constexpr):
    KB: tl.constexpr = 8 * W  # kernel columns per K-block (4-bit: 8 chunks of W words)
    ONE_GROUP: tl.constexpr = GS == 0
    DT: tl.constexpr = x_desc.dtype
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if ONE_GROUP:  # per-channel: exact integers into the MMA, one scale in the epilogue
        s, ce, co = _group_consts(s_ptr, z_ptr, 0, N, offs_n, N, 4, HAS_ZEROS, USE_ASM, DT, BLOCK_N)
    for kb in tl.range(0, num_kb, num_stages=STAGES):
        q = q_desc.load([kb * N + n0, 0])  # [BN, W] int32
        if not ONE_GROUP:
            s, ce, co = _group_consts(s_ptr, z_ptr, kb * KB // GS, N, offs_n, N, 4, HAS_ZEROS, USE_ASM, DT,
                                      BLOCK_N)
        a = _unpack_group(q, ce, co, s, 0, 8, 4, USE_ASM, not ONE_GROUP, DT)  # [BN, KB]
        xt = x_desc.load([m0, kb * KB])  # [BM, KB]
        if SWAP:
            acc = tl.dot(a, tl.trans(xt), acc)
        else:
            acc = tl.dot(xt, tl.trans(a), acc)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if SWAP:
        if ONE_GROUP:
            acc = acc * s
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])
    else:
        if ONE_GROUP:
            acc = acc * tl.reshape(s, (1, BLOCK_N))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def tma_supported(w: W4A16Weights) -> bool:
    """4-bit, groups of whole K-blocks (or per-channel): what w4a16_tma_kernel walks."""
    return w.bits == 4 and (w.gk == 0 or w.gk % w.block_k == 0)


def tma_input(x2: torch.Tensor, w: W4A16Weights) -> torch.Tensor:
    """x [M, K] as a TMA source: columns in kernel order (act-order), unit column stride, 16-byte aligned rows."""
    if w.perm is not None:  # act-order: padding columns read a zero column
        x2 = torch.nn.functional.pad(x2, (0, 1))[:, torch.where(w.perm >= 0, w.perm, w.k)]
    if x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # also re-aligns the base
        if (x2.shape[1] * x2.element_size()) % 16:  # TMA rows are 16-byte multiples; padding reads W = 0 anyway
            x2 = torch.nn.functional.pad(x2, (0, (-x2.shape[1]) % 8))
    return x2


def w4a16_tma_gemm(x2: torch.Tensor, w: W4A16Weights, bias: torch.Tensor | None, cfg: dict,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W^T (+ bias) with w4a16_tma_kernel; cfg: BLOCK_N, BLOCK_M, SWAP, warps, stages."""
    assert tma_supported(w), "w4a16_tma_gemm: 4-bit weights with Gk = 0 or a multiple of the K-block"
    m = x2.shape[0]
    x2 = tma_input(x2, w)
    if y is None:
        y = torch.empty((m, w.n), dtype=x2.dtype, device=x2.device)
    bn, bm = cfg["BLOCK_N"], cfg["BLOCK_M"]
    x_desc = TensorDescriptor.from_tensor(x2, [bm, w.block_k])
    q_desc = TensorDescriptor.from_tensor(w.qweight.view(-1, w.words), [bn, w.words])
    grid = (triton.cdiv(w.n, bn) * triton.cdiv(m, bm),)
    w4a16_tma_kernel[grid](
        x_desc, q_desc, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else y, y, m, w.n, y.stride(0), w.k_pad // w.block_k,
        GS=w.gk, HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, USE_ASM=not interpreting(),
        SWAP=cfg.get("SWAP", True), BLOCK_N=bn, BLOCK_M=bm, GROUP_M=cfg.get("GROUP_M", 8), W=w.words,
        STAGES=cfg.get("num_stages", 3), num_warps=cfg.get("num_warps", 8), num_stages=cfg.get("num_stages", 3))
    return y
