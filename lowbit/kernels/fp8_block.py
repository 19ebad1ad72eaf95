"""fp8 GEMM with per-K-block scales for M > 16 (the DeepGEMM role): y = (A * sa) @ (W * sw)^T, fp32 accumulation.

Per K-block of 128 the fp8 MMA result is scaled before it is added (DeepSeek-V3 fine-grained scaling):
    acc[m, n] += (A[m, kb] @ W[n, kb]^T) * sa[m, kb] * sw[rb[n], kb]      (per-K scales)
    y[m, n]    = acc[m, n] * sa[m] * sw[n] + bias[n]                      (per-row scales, in the epilogue)

| operand | dtype / shape                                  | scale (fp32)                                     |
|---------|------------------------------------------------|--------------------------------------------------|
| A       | e4m3 [M, K]                                    | A_GROUP: [M, ceil(K/128)] (any strides; column-major is coalesced) / else [M] or [1] (stride 0) |
| W fp8   | e4m3 [N, K]                                    | B_GRID: grid [R, ceil(K/128)] + rb [N] int32 (grid row of weight row n) / else [N] |
| y       | fp16 / bf16 / fp32 [M, N]                       | bias [N] optional                                |

The rb indirection serves block grids of fused layers whose shards are not multiples of the block
(each shard starts a new grid row); w4a8's int4 -> e4m3 scratch uses it with 1 x 128 group scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

BLOCK_K = 128  # = the scale block along K (fp8 block 128, w4a8 group 128, activation group 128)

# (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages) by M: defaults; configs/fp8_block.json
# (bench/kernels/fp8_tune.py `tune` on H200) override them
CONFIGS = {
    "small": (64, 128, 8, 4, 4),  # M <= 64
    "medium": (128, 128, 8, 8, 4),  # M <= 512
    "large": (128, 128, 8, 8, 4),
}


@triton.jit
def load_w_tile(w_ptr, offs_n, k0, N, K, stride_wn, stride_wk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """e4m3 weight tile [BLOCK_N, BLOCK_K] of the K-block starting at k0 (zeros past N and K)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
    return tl.load(ptrs, mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)


@triton.jit
def fp8_block_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, rb_ptr, bias_ptr, y_ptr,
    M, N, K, stride_am, stride_asm, stride_ask, stride_wn, stride_wk, stride_wsr, stride_ym,
    A_GROUP: tl.constexpr, B_GRID: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # TMA: a_ptr / w_ptr are host tensor descriptors (blocks [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K], OOB = 0)
    # grouped launch order: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    if not TMA:
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    if B_GRID:
        sw_rows = ws_ptr + tl.load(rb_ptr + offs_n, mask=mask_n, other=0) * stride_wsr  # [BN] grid row pointers

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if TMA:
            a = a_ptr.load([pid_m * BLOCK_M, k0])
            w = w_ptr.load([pid_n * BLOCK_N, k0])
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (k0 + offs_k[None, :] < K), other=0.0)  # [BM, BK] e4m3
            w = load_w_tile(w_ptr, offs_n, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K)
        if A_GROUP or B_GRID:
            part = tl.dot(a, tl.trans(w))
            kb = k0 // BLOCK_K
            if A_GROUP and B_GRID:
                sa = tl.load(as_ptr + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)
                acc += part * (sa[:, None] * tl.load(sw_rows + kb, mask=mask_n, other=0.0)[None, :])
            elif A_GROUP:
                acc += part * tl.load(as_ptr + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)[:, None]
            else:
                acc += part * tl.load(sw_rows + kb, mask=mask_n, other=0.0)[None, :]
        else:
            # promoted to the fp32 accumulator every K-block: sm90 fp8 MMAs accumulate with ~14 mantissa bits
            # (DeepSeek-V3 report, sec. 3.3.2), which loses ~1% over K = 7168 when chained inside the MMA
            acc += tl.dot(a, tl.trans(w))
        if not TMA:
            a_ptrs += BLOCK_K

    # per-row scales and bias in the epilogue
    if not A_GROUP:
        acc *= tl.load(as_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)[:, None]
    if not B_GRID:
        acc *= tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def tma_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides (K % 16 == 0) and a unit inner stride."""
    return (a.stride(1) == 1 and w.stride(1) == 1 and a.stride(0) % 16 == 0 and w.stride(0) % 16 == 0
            and a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def block_config(m: int, tuned: dict | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages) for M rows: the tuned table, else CONFIGS."""
    key = "small" if m <= 64 else "medium" if m <= 512 else "large"
    if tuned and key in tuned:
        return tuple(tuned[key])
    return CONFIGS[key]


def fp8_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, a_group: bool, w: torch.Tensor, w_scale: torch.Tensor,
                   w_rows: torch.Tensor | None, n: int, k: int, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.bfloat16, config: tuple | None = None,
                   tma: bool = False) -> torch.Tensor:
    """y [M, N] = scaled fp8 GEMM (see the table). a_scale: [M, ceil(K/128)] (a_group) or [M, 1] / [1];
    w_scale: grid (w_rows given) or [N]. tma: load A and fp8 W through TMA descriptors where `tma_ok`.
    Layout checks belong to the callers (fp8_gemm.py, w4a8.py)."""
    if a.dtype != torch.float8_e4m3fn or a.dim() != 2 or a.shape[1] != k or a.stride(1) != 1:
        raise ValueError(f"fp8_block_gemm: a must be e4m3 [M, {k}] with unit stride along K, got {a.dtype} "
                         f"{tuple(a.shape)} strides {a.stride()}")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fp8_block_gemm: out_dtype {out_dtype} is not supported; supported: fp16, bf16, fp32")
    m = a.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, group_m, warps, stages = config or block_config(m)
    if a_group:
        stride_asm, stride_ask = a_scale.stride(0), a_scale.stride(1)
    else:
        stride_asm, stride_ask = (a_scale.stride(0) if a_scale.numel() > 1 else 0), 0
    stride_wn, stride_wk = w.stride(0), w.stride(1)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    a_arg, w_arg = a, w
    if tma and tma_ok(a, w):
        a_arg = TensorDescriptor.from_tensor(a, [block_m, BLOCK_K])
        w_arg = TensorDescriptor.from_tensor(w, [block_n, BLOCK_K])
    fp8_block_gemm_kernel[grid](
        a_arg, a_scale, w_arg, w_scale, w_rows if w_rows is not None else w_scale, bias if bias is not None else y, y,
        m, n, k, a.stride(0), stride_asm, stride_ask, stride_wn, stride_wk,
        w_scale.stride(0) if w_rows is not None else 0, y.stride(0),
        A_GROUP=a_group, B_GRID=w_rows is not None, HAS_BIAS=bias is not None, TMA=a_arg is not a,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return y
