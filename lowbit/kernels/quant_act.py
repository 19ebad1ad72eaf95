"""Activation quantization to fp8 e4m3 (Triton), plus a fused SiLU-and-mul + quantize for the MLP.

Math (identical to reference.quantize_fp8_ref, so results are bitwise equal):
    s  = max(amax / 448, 1e-12)            amax over the tensor / the token / the 1 x G group
    s  = 2^ceil(log2 s)                    token_group with ue8m0 (DeepSeek-V3.1 power-of-two scales)
    xq = e4m3_rne(clamp(x / s, -448, 448)) IEEE division (div_rn), round to nearest even, saturating
silu_mul_quantize_fp8 quantizes h = silu(gate) * up, rounded to x.dtype after the SiLU and after the
product, exactly as the unfused `F.silu(gate) * up` in the model dtype would be (the exp of the SiLU may
differ from torch's in the last fp32 bit, so h - and through the scale the fp8 codes - can differ by 1 ulp).

| granularity    | x                  | xq           | scale (fp32)                                  |
|----------------|--------------------|--------------|-----------------------------------------------|
| tensor_static  | [M, K] 16/32-bit   | [M, K] e4m3  | [1] (the given scale)                         |
| tensor_dynamic | [M, K]             | [M, K] e4m3  | [1]                                           |
| token          | [M, K]             | [M, K] e4m3  | [M, 1]                                        |
| token_group    | [M, K]             | [M, K] e4m3  | [M, ceil(K/G)] (column_major_scales: strides (1, M), what the GEMMs read) |
silu_mul_quantize_fp8 takes x [M, 2I] = gate | up and returns xq [M, I] with the scales above for K = I.
pre_quant_scale [K] (x's dtype; AWQ smoothing as ModelOpt W4A8-AWQ stores it, on o_proj / down_proj): x (or the
SiLU product) times it, rounded to x's dtype as the unfused `x * pre_quant_scale`, is what gets quantized, in the
same pass (quantize_fp8, silu_mul_quantize_fp8, fake_quantize_act_fp8).

Under TRITON_INTERPRET the CPU interpreter's fp32 -> e4m3 cast does not round correctly, so the kernels
build the e4m3 bits with integer arithmetic there (SOFT_CAST); on the GPU the hardware cvt.rn.satfinite.
The jit helpers `fp8_scale` and `quantize_tile_rcp` are shared with the GEMM kernels that quantize in-kernel.

tensor_dynamic is two launches after a 4-byte memset: amax_kernel (one atomic_max per program; from M = 1024 one
program per row walks K in 1024-element steps: 43.2 -> 41.4 us alone at 8192 x 7168 bf16, whole op 108.0 -> 106.5 us,
SiLU 8192 x 18432 532 -> 489 us, H100, same run), then quant_fp8_rows_kernel MODE 1, which reads x again. x
(117 MB there) exceeds the L2, so the bytes moved are 2 + 2 + 1 per element against 2 + 1 counted: <= ~60% of copy.
Tried, measured, not kept (H100, CUDA-graph replay, 8192 x 7168 bf16, 2026-11-26; static 59.5 us, amax alone 43.7):
- L2 reuse across the two launches: the quantize pass in reverse row order, the amax pass's last 24-40 MB loaded
  with evict_last (the rest evict_first), the quantize pass's loads/stores evict_first or not: 100.3-103.9 us
  against 103.3-103.8 all-forward, evict_first everywhere. The L2 keeps at most ~3 us worth of x between passes.
- One persistent launch (grid = co-resident programs, tiles interleaved over programs, pass 1 amax into per-program
  partials, a self-resetting atomic-counter grid barrier, pass 2 over the same tiles in reverse with evict_last on
  the last 0-48 MB of pass 1; prefetching the next tile; 8x1024 / 1x8192 / 16x1024 tiles, 1-8 programs per SM):
  109.4-119.7 us against 107.7-109.3 us for the two launches; the evict_last window size changed nothing.
- amax pass: 2-32 rows x 512-2048 columns per program, or per-program partials instead of atomics (with the
  quantize pass reducing them): 40.5-49.7 us alone, 104.8-113.4 us whole against 107.9 in that run (within noise
  of the shape kept; 2-row quantize programs cost 4-6 us more).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

FP8 = torch.float8_e4m3fn
GRANULARITIES = ("tensor_static", "tensor_dynamic", "token", "token_group")
_IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# launch shapes as data: elements per program ~ 8K keeps 16-byte loads in flight on every SM
ROWS_MAX_SINGLE_K = 16384  # up to this K a token row is read once (amax and quantize from registers)
ROWS_BLOCK_K_LOOP = 4096  # beyond it: two passes over BLOCK_K chunks (the second mostly hits L2) ...
ROWS_TWO_TILES_MAX_K = 32768  # ... except SiLU-mul token rows up to this K: two register tiles (16384 + the rest)
ROWS_TWO_TILES_WARPS = 32  # (H100, SiLU-mul + token quantize, bf16, M = 8192: I = 18432 475 -> 421 us, 25600 694 ->
# 606, 28672 705 -> 586; M = 512, I = 18432 39.6 -> 29.7 us; the same with 16 warps 420-730 us. Plain token
# quantize gained at some K and lost at others (18432: 175 us two passes, 158-252 on two tiles), so it keeps the loop.
# Not kept: persistent programs, 1-4 per SM, walking whole rows with both passes, so that the rows in flight stay in
# the L2: 508-1427 us at M = 8192, I = 18432)
ROWS_SPLIT_BELOW = 64  # tensor_static / tensor_dynamic with fewer row programs than this (decode): the rows are ...
ROWS_SPLIT_BLOCK_K = 512  # ... cut into K tiles of this many columns, one program each (H100, SiLU-mul + static
# quantize at M = 1, I = 18432: 10.4 us on one program per row)
GROUP_TILE_ELEMS = 4096  # token_group programs cover BLOCK_M x BLOCK_G groups of G
GROUP_MIN_PROGRAMS = 128  # ... halving BLOCK_G while there are fewer programs (H100, SiLU-mul + token_group at M = 1,
# I = 18432: 5.6 us on 5 programs)
AMAX_BLOCK_K = 1024  # tensor_dynamic amax pass: 1024-element steps (2 KB of bf16 per program per step)
AMAX_ROWS_MIN_M = 1024  # from this M one program per row walks all of K; below it programs split K ...
AMAX_SPLIT_K = 1024  # ... in AMAX_SPLIT_K columns, so small M still spreads over the SMs


def soft_cast() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def e4m3_rne(v, SOFT: tl.constexpr):
    """fp32 in [-448, 448] -> float8e4nv, round to nearest even (integer path for the interpreter)."""
    if SOFT:
        u = v.to(tl.int32, bitcast=True)
        a = tl.abs(v)
        ua = a.to(tl.int32, bitcast=True)
        # normal range: round the fp32 mantissa to 3 bits (carry ripples into the exponent), rebias 127 -> 7
        r = (ua + 0x7FFFF + ((ua >> 20) & 1)) & -1048576
        normal = (r >> 20) - 960
        # subnormal range (< 2^-6): multiples of 2^-9, rounded to even by the 2^23 trick
        sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
        code = tl.where(a < 0.015625, sub, normal) | (((u >> 31) & 1) << 7)
        code = tl.where(v != v, 127, code)  # NaN -> 0x7F, as torch's cast (and the GPU's cvt) give
        out = code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        out = v.to(tl.float8e4nv)
    return out


@triton.jit
def e4m3_sat(v, SOFT: tl.constexpr):
    """fp32 -> float8e4nv, round to nearest even, saturating at +-448: on the GPU the cast is cvt.rn.satfinite (it
    saturates by itself, NaN stays NaN; an explicit clamp measured 1.5-2 us slower in the w4a8 decode kernel at
    M <= 16, H100); the interpreter's integer path needs the range clamped first."""
    if SOFT:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    return e4m3_rne(v, SOFT)


# torch divides by a Python scalar as x * fp32(1/448) on CUDA and with IEEE division on the CPU; the scale
# follows the reference on each device, so kernel and reference scales are bitwise equal on both
TORCH_CPU_DIV = tl.constexpr(soft_cast())


@triton.jit
def fp8_scale(amax, UE8M0: tl.constexpr):
    """amax (fp32, >= 0) -> scale = max(amax / 448, 1e-12), optionally rounded up to a power of two."""
    if TORCH_CPU_DIV:
        s = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1e-12)
    else:
        s = tl.maximum(amax * 0.002232142857142857, 1e-12)  # fp32(1 / 448)
    if UE8M0:
        # exact ceil to a power of two: bump the exponent when any mantissa bit is set
        s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def quantize_tile(xf, s, SOFT: tl.constexpr):
    """xf fp32 [..], s fp32 broadcastable -> e4m3(clamp(xf / s, -448, 448)). Callers put 1.0 in masked-off lanes:
    a zero dividend takes the IEEE division's slow path (padding rows cost 2-3x on H100)."""
    return e4m3_sat(tl.math.div_rn(xf, s + tl.zeros_like(xf)), SOFT)


@triton.jit
def quantize_tile_rcp(xf, inv_s, SOFT: tl.constexpr):
    """e4m3(clamp(xf * (1 / s))) for the GEMMs that quantize x in-kernel: an fp32 multiply instead of the IEEE
    division, whose slow path (zero dividends: the padding rows of M < 16) doubled the M = 1 time on H100/H200.
    Codes can differ from quantize_fp8 by one e4m3 step where x / s lies within an fp32 ulp of a tie."""
    return e4m3_sat(xf * inv_s, SOFT)


@triton.jit
def _rounded(v, DT: tl.constexpr):
    """fp32 v rounded to DT (nearest even) and back to fp32; the interpreter truncates to bf16, so there the
    rounding is done on the bits."""
    if TORCH_CPU_DIV and DT == tl.bfloat16:  # (TORCH_CPU_DIV: running in the interpreter)
        u = v.to(tl.int32, bitcast=True)
        out = ((u + 0x7FFF + ((u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    else:
        out = v.to(DT).to(tl.float32)
    return out


@triton.jit
def _exp(v, DT: tl.constexpr):
    """exp(v) for the SiLU: fp32 x on the GPU takes libdevice's expf (torch's CUDA exp; tl.exp's ex2.approx of
    v * log2(e) was up to 12 fp32 ulps off torch's SiLU on H100), 16-bit x the fast one (its error is below their
    rounding but for rare ties: one fp16 value in 15000 two ulps off, tests/kernels/test_activation.py)."""
    if TORCH_CPU_DIV:  # (the interpreter: numpy's exp)
        out = tl.exp(v)
    elif DT == tl.float32:
        out = libdevice.exp(v)
    else:
        out = tl.exp(v)
    return out


@triton.jit
def _load_act(ptrs, mask, half, SILU: tl.constexpr, pqs_ptrs, PQS: tl.constexpr):
    """x tile as fp32; SILU: silu(x[.., :I]) * x[.., I:] with the model-dtype roundings of the unfused op; PQS:
    then times the per-column pre_quant_scale (pqs_ptrs: its address per column, in x's dtype), rounded to x's
    dtype as the unfused `x * pre_quant_scale` is."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if SILU:
        up = tl.load(ptrs + half, mask=mask, other=0.0)
        g = x.to(tl.float32)
        act = _rounded(tl.math.div_rn(g, 1.0 + _exp(-g, x.dtype)), x.dtype)
        h = _rounded(act * up.to(tl.float32), x.dtype)
    else:
        h = x.to(tl.float32)
    if PQS:
        h = _rounded(h * tl.load(pqs_ptrs, mask=mask, other=0.0).to(tl.float32), x.dtype)
    return h


@triton.jit
def _out(q, s, y_ptr, DEQ: tl.constexpr, SOFT: tl.constexpr):
    """The stored value: the e4m3 code, or (DEQ) its value q * s rounded to y's dtype (fake quantization)."""
    if DEQ:  # (one return: compiled Triton checks both branches' return types, pruned or not)
        v = q.to(tl.float32) * s
        if SOFT and y_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter truncates to bf16: round to even here
            u = v.to(tl.int32, bitcast=True)
            v = ((u + 0x7FFF + ((u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        out = v.to(y_ptr.dtype.element_ty)
    else:
        out = q
    return out


@triton.jit
def quant_fp8_rows_kernel(
    x_ptr, y_ptr, s_ptr, amax_ptr, pqs_ptr,  # x [M, K or 2K], y [M, K] e4m3, s: [1] (static) / [M] (token, out) /
    M, K, stride_xm, stride_xk, stride_ym, stride_sm,  # [1] (dyn, out); pqs [K] (PQS)
    MODE: tl.constexpr,  # 0 static scale, 1 tensor_dynamic (scale from the global amax), 2 token
    SILU: tl.constexpr, SINGLE: tl.constexpr, SOFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DEQ: tl.constexpr = False, PQS: tl.constexpr = False,
    BLOCK_K2: tl.constexpr = 0,  # SINGLE: a second tile, columns [BLOCK_K, BLOCK_K + BLOCK_K2), for rows > BLOCK_K
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (a K split: static / dynamic SINGLE tiles only)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    y_rows = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym
    half = K * stride_xk  # offset of the up half for SILU
    if MODE == 0:
        s = tl.load(s_ptr) + tl.zeros([BLOCK_M], tl.float32)
    elif MODE == 1:
        s = fp8_scale(tl.load(amax_ptr) + tl.zeros([BLOCK_M], tl.float32), False)
        if (pid == 0) & (tl.program_id(1) == 0):
            tl.store(s_ptr, tl.max(s, axis=0))
    if SINGLE:  # the whole row (or, split, a K tile of it) in registers: one read
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        h = _load_act(x_rows + offs_k[None, :] * stride_xk, mask, half, SILU, pqs_ptr + offs_k[None, :], PQS)
        if BLOCK_K2 > 0:  # both tiles held in x's dtype (h is rounded to it already: exact), half the registers
            h = h.to(x_ptr.dtype.element_ty)
            offs_k2 = BLOCK_K + tl.arange(0, BLOCK_K2)
            mask2 = mask_m[:, None] & (offs_k2[None, :] < K)
            h2 = _load_act(x_rows + offs_k2[None, :] * stride_xk, mask2, half, SILU, pqs_ptr + offs_k2[None, :],
                           PQS).to(x_ptr.dtype.element_ty)
        if MODE == 2:
            amax = tl.max(tl.abs(h.to(tl.float32)), axis=1)
            if BLOCK_K2 > 0:
                amax = tl.maximum(amax, tl.max(tl.abs(h2.to(tl.float32)), axis=1))
            s = fp8_scale(amax, False)  # [BLOCK_M]
            tl.store(s_ptr + offs_m * stride_sm, s, mask=mask_m)
        q = quantize_tile(tl.where(mask, h.to(tl.float32), 1.0), s[:, None], SOFT)
        tl.store(y_rows + offs_k[None, :], _out(q, s[:, None], y_ptr, DEQ, SOFT), mask=mask)
        if BLOCK_K2 > 0:
            q2 = quantize_tile(tl.where(mask2, h2.to(tl.float32), 1.0), s[:, None], SOFT)
            tl.store(y_rows + offs_k2[None, :], _out(q2, s[:, None], y_ptr, DEQ, SOFT), mask=mask2)
    else:
        if MODE == 2:  # pass 1: amax of each row
            amax = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = mask_m[:, None] & (k0 + offs_k[None, :] < K)
                h = _load_act(x_rows + (k0 + offs_k[None, :]) * stride_xk, mask, half, SILU,
                              pqs_ptr + k0 + offs_k[None, :], PQS)
                amax = tl.maximum(amax, tl.max(tl.abs(h), axis=1))
            s = fp8_scale(amax, False)
            tl.store(s_ptr + offs_m * stride_sm, s, mask=mask_m)
        for k0 in range(0, K, BLOCK_K):
            mask = mask_m[:, None] & (k0 + offs_k[None, :] < K)
            h = _load_act(x_rows + (k0 + offs_k[None, :]) * stride_xk, mask, half, SILU, pqs_ptr + k0 + offs_k[None, :],
                          PQS)
            q = quantize_tile(tl.where(mask, h, 1.0), s[:, None], SOFT)
            tl.store(y_rows + k0 + offs_k[None, :], _out(q, s[:, None], y_ptr, DEQ, SOFT), mask=mask)


@triton.jit
def quant_fp8_groups_kernel(
    x_ptr, y_ptr, s_ptr, pqs_ptr,  # x [M, K or 2K], y [M, K] e4m3, s [M, ceil(K/G)] (strides (stride_sm, stride_sg)),
    M, K, stride_xm, stride_xk, stride_ym, stride_sm, stride_sg,  # pqs [K] (PQS)
    G: tl.constexpr, UE8M0: tl.constexpr, SILU: tl.constexpr, SOFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, DEQ: tl.constexpr = False, PQS: tl.constexpr = False,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_k = offs_g[None, :, None] * G + tl.arange(0, G)[None, None, :]  # [1, BLOCK_G, G]
    mask = (offs_m[:, None, None] < M) & (offs_k < K)
    rows = offs_m[:, None, None].to(tl.int64)
    h = _load_act(x_ptr + rows * stride_xm + offs_k * stride_xk, mask, K * stride_xk, SILU, pqs_ptr + offs_k,
                  PQS)  # [BM, BG, G]
    s = fp8_scale(tl.max(tl.abs(h), axis=2), UE8M0)  # [BM, BG]
    s_mask = (offs_m[:, None] < M) & (offs_g[None, :] * G < K)
    tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_g[None, :] * stride_sg, s, mask=s_mask)
    q = quantize_tile(tl.where(mask, h, 1.0), s[:, :, None], SOFT)
    tl.store(y_ptr + rows * stride_ym + offs_k, _out(q, s[:, :, None], y_ptr, DEQ, SOFT), mask=mask)


@triton.jit
def amax_kernel(x_ptr, amax_ptr, pqs_ptr, M, K, stride_xm, stride_xk, K_SPLIT,
                SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PQS: tl.constexpr = False):
    """amax over [M, K] (of h for SILU) into amax_ptr[0] (zeroed by the caller), one atomic per program; program
    (i, j) covers rows [i * BLOCK_M, +BLOCK_M) and columns [j * K_SPLIT, +K_SPLIT) in BLOCK_K steps."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(1) * K_SPLIT
    offs_k = tl.arange(0, BLOCK_K)
    rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(k_lo, tl.minimum(K, k_lo + K_SPLIT), BLOCK_K):
        mask = (offs_m[:, None] < M) & (k0 + offs_k[None, :] < K) & (k0 + offs_k[None, :] < k_lo + K_SPLIT)
        h = _load_act(rows + (k0 + offs_k[None, :]) * stride_xk, mask, K * stride_xk, SILU,
                      pqs_ptr + k0 + offs_k[None, :], PQS)
        acc = tl.maximum(acc, tl.abs(h))
    tl.atomic_max(amax_ptr, tl.max(tl.max(acc, axis=1), axis=0))


def _check(x: torch.Tensor, granularity: str, scale, group_size: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{what}: x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _IN_DTYPES:
        raise ValueError(f"{what}: x dtype {x.dtype} is not supported; supported: {_IN_DTYPES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{what}: granularity {granularity!r} is not supported; supported: {GRANULARITIES}")
    if granularity == "tensor_static":
        if scale is None or scale.numel() != 1:
            raise ValueError(f"{what}: tensor_static needs a one-element scale, got {None if scale is None else scale.shape}")
        if scale.device != x.device:
            raise ValueError(f"{what}: scale is on {scale.device}, x on {x.device}")
    if granularity == "token_group" and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"{what}: group_size {group_size} is not supported; supported: powers of two >= 16")


def empty_group_scales(m: int, k: int, group_size: int, column_major: bool, device) -> torch.Tensor:
    """The fp32 [M, ceil(K/G)] token_group scales, row-major or column-major (strides (1, M), what the GEMMs read)."""
    ng = math.ceil(k / group_size)
    if column_major:
        return torch.empty((ng, m), dtype=torch.float32, device=device).t()
    return torch.empty((m, ng), dtype=torch.float32, device=device)


def _quantize(x, k, granularity, scale, group_size, ue8m0, column_major_scales, silu, deq=False, pqs=None):
    m = x.shape[0]
    pqs_arg = pqs if pqs is not None else x
    y = torch.empty((m, k), dtype=x.dtype if deq else FP8, device=x.device)
    soft = soft_cast()
    if granularity == "token_group":
        s = empty_group_scales(m, k, group_size, column_major_scales, x.device)
        ng = s.shape[1]
        if m == 0 or k == 0:
            return y, s
        block_g = min(triton.next_power_of_2(ng), max(1, GROUP_TILE_ELEMS // group_size))
        block_m = min(max(1, GROUP_TILE_ELEMS // (block_g * group_size)), triton.next_power_of_2(m))
        while block_g > 1 and triton.cdiv(m, block_m) * triton.cdiv(ng, block_g) < GROUP_MIN_PROGRAMS:
            block_g //= 2  # few rows (decode): smaller tiles, so that the programs spread over the SMs
        grid = (triton.cdiv(m, block_m), triton.cdiv(ng, block_g))
        quant_fp8_groups_kernel[grid](x, y, s, pqs_arg, m, k, x.stride(0), x.stride(1), y.stride(0), s.stride(0),
                                      s.stride(1), G=group_size, UE8M0=ue8m0, SILU=silu, SOFT=soft, BLOCK_M=block_m,
                                      BLOCK_G=block_g, DEQ=deq, PQS=pqs is not None, num_warps=4)
        return y, s
    single = k <= ROWS_MAX_SINGLE_K
    block_k = max(16, triton.next_power_of_2(k)) if single else ROWS_BLOCK_K_LOOP
    block_m = max(1, 2048 // block_k)
    num_warps = max(4, min(16, block_k // 512))
    block_k2 = 0
    if silu and granularity == "token" and ROWS_MAX_SINGLE_K < k <= ROWS_TWO_TILES_MAX_K:  # two register tiles
        single, block_k, block_m, num_warps = True, ROWS_MAX_SINGLE_K, 1, ROWS_TWO_TILES_WARPS
        block_k2 = max(16, triton.next_power_of_2(k - ROWS_MAX_SINGLE_K))
    k_split = granularity != "token" and triton.cdiv(m, block_m) < ROWS_SPLIT_BELOW and k > ROWS_SPLIT_BLOCK_K
    if k_split:  # elementwise once the scale is known: few rows spread over the SMs in K tiles
        single, block_k, block_m, num_warps = True, ROWS_SPLIT_BLOCK_K, 1, 4
    amax = s_out = None
    if granularity == "tensor_static":
        mode, s_out = 0, scale.reshape(1).to(torch.float32)
    elif granularity == "tensor_dynamic":
        mode, s_out = 1, torch.empty(1, dtype=torch.float32, device=x.device)
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
        if m and k:
            bk = min(triton.next_power_of_2(k), AMAX_BLOCK_K)
            bm = max(1, AMAX_BLOCK_K // bk)
            # whole rows per program once M fills the GPU (fewer atomics, loads in flight over the K loop)
            split = k if m >= AMAX_ROWS_MIN_M else AMAX_SPLIT_K
            amax_kernel[(triton.cdiv(m, bm), triton.cdiv(k, split))](x, amax, pqs_arg, m, k, x.stride(0), x.stride(1),
                                                                     split, SILU=silu, BLOCK_M=bm, BLOCK_K=bk,
                                                                     PQS=pqs is not None, num_warps=4)
        else:
            s_out.fill_(1e-12)
    else:
        mode, s_out = 2, torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return y, s_out
    quant_fp8_rows_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k) if k_split else 1)](
        x, y, s_out, amax if amax is not None else s_out, pqs_arg, m, k, x.stride(0), x.stride(1), y.stride(0),
        s_out.stride(0) if mode == 2 else 0, MODE=mode, SILU=silu, SINGLE=single, SOFT=soft,
        BLOCK_M=block_m, BLOCK_K=block_k, DEQ=deq, PQS=pqs is not None, BLOCK_K2=block_k2, num_warps=num_warps)
    return y, s_out


def _pqs(pre_quant_scale, x: torch.Tensor, k: int, what: str):
    """The per-column pre_quant_scale (AWQ smoothing) as the kernels read it, checked: [K] in x's dtype."""
    if pre_quant_scale is None:
        return None
    if tuple(pre_quant_scale.shape) != (k,) or pre_quant_scale.dtype != x.dtype or pre_quant_scale.device != x.device:
        raise ValueError(f"{what}: pre_quant_scale must be [K={k}] {x.dtype} on {x.device}, got "
                         f"{pre_quant_scale.dtype} {tuple(pre_quant_scale.shape)} on {pre_quant_scale.device}")
    return pre_quant_scale.contiguous()


def quantize_fp8(x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None, group_size: int = 128,
                 ue8m0: bool = False, column_major_scales: bool = False,
                 pre_quant_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] e4m3, scale); the contract of reference.quantize_fp8_ref (ue8m0: token_group only).
    pre_quant_scale [K] (x's dtype): x * pre_quant_scale rounded to x's dtype is what gets quantized (one pass)."""
    _check(x, granularity, scale, group_size, "quantize_fp8")
    pqs = _pqs(pre_quant_scale, x, x.shape[1], "quantize_fp8")
    return _quantize(x, x.shape[1], granularity, scale, group_size, ue8m0, column_major_scales, silu=False, pqs=pqs)


def fake_quantize_act_fp8(x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None,
                          group_size: int = 128, ue8m0: bool = False, silu_mul: bool = False,
                          pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> the values quantize_fp8 stands for, xq * scale, rounded to x.dtype, in one pass (a GEMM on 16-bit
    operands then computes the fp8-activation product, w4a8.py's "w16" candidate). silu_mul: x is gate | up
    [M, 2I] and the values are those of silu_mul_quantize_fp8 ([M, I]); pre_quant_scale as quantize_fp8."""
    _check(x, granularity, scale, group_size, "fake_quantize_act_fp8")
    if silu_mul and x.shape[1] % 2:
        raise ValueError(f"fake_quantize_act_fp8: x has an odd last dim {x.shape[1]}; expected gate|up halves")
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    pqs = _pqs(pre_quant_scale, x, k, "fake_quantize_act_fp8")
    return _quantize(x, k, granularity, scale, group_size, ue8m0, False, silu=silu_mul, deq=True, pqs=pqs)[0]


def silu_mul_quantize_fp8(x_gate_up: torch.Tensor, granularity: str, scale: torch.Tensor | None = None,
                          group_size: int = 128, ue8m0: bool = False, column_major_scales: bool = False,
                          pre_quant_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2I] = gate | up -> quantize_fp8(silu(gate) * up) as (xq [M, I] e4m3, scale); pre_quant_scale [I] (x's
    dtype) multiplies the product first, rounded to x's dtype (the unfused `h * pre_quant_scale`)."""
    _check(x_gate_up, granularity, scale, group_size, "silu_mul_quantize_fp8")
    if x_gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul_quantize_fp8: x has an odd last dim {x_gate_up.shape[1]}; expected gate|up halves")
    k = x_gate_up.shape[1] // 2
    pqs = _pqs(pre_quant_scale, x_gate_up, k, "silu_mul_quantize_fp8")
    return _quantize(x_gate_up, k, granularity, scale, group_size, ue8m0, column_major_scales, silu=True, pqs=pqs)
