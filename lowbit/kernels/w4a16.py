"""w4a16 GEMM: y[M, N] = x[M, K] @ W^T (+ bias) with W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g].

Over 300 lines because the kernel, its int4 unpack, its two launch paths and its opt-in fp8-activation mode only
make sense together; the weight layout lives in w4a16_layout.py, the launch configs in w4a16_tune.py and the
fp8-activation wrapper (w4a8's decode path) in w4a16_fp8act.py.

Per K-block t of the repacked weight (KB = P * W kernel columns; chunk i is bitfield i of a [N, W]
word tile; c = t*KB + i*W + j) the kernel computes, "swap AB", acc^T += W_tile @ x_tile^T:

    acc[n, m] += sum_{i, j} (q[n, c] - z[n, g(c)]) * s[n, g(c)] * x[m, perm(c)]

so weight rows are the MMA's 64-row side (wgmma A operand, unpacked in registers) and tokens its
16..256-wide side: M = 1..16 costs one 16-wide MMA per chunk while every SM streams weights.
Scale-after mode feeds the exact integers (q - z) to the MMA and scales each group's fp32 partial
once (small M); pre-scaled mode multiplies the 16-bit operand by s (large token tiles).
int4 unpack (GPU): two words -> four nibbles as 16-bit pairs with prmt + lop3 into the exponent of
1024 (fp16, 0x6400) or 128 (bf16, 0x4300) and one fma that removes the bias and the zero, exactly;
the magic-number idea is from Kim et al. 2022 (arXiv:2211.10017) and Marlin (arXiv:2408.11743).
fp8 activations (opt-in A_FP8 > 0, w4a16_gemm_fp8act: the w4a8 decode GEMM, symmetric int4, G = 128 = one K-block):
x is quantized to e4m3 on its load (static scale, or per token group of 128) or arrives as e4m3 (with per-token or
per-token-group scales); e4m3 values and
q - 8 are exact in fp16, so the fp16 MMA products are exact and, in scale-after mode,
    acc[n, m] += (sum_{c in g} (q[n, c] - 8) * xq[m, c]) * s[n, g] * sx[m, g]    (sx per tensor / token: epilogue)

| tensor        | dtype          | shape            | notes                                         |
|---------------|----------------|------------------|-----------------------------------------------|
| x             | fp16 / bf16    | [..., K]         | any strides (fp8 mode: also fp32, or e4m3)    |
| xs            | fp32           | [1] / [M] / [M, ceil(K/128)] | fp8: static / token / e4m3 groups (row-major) |
| pre_quant_scale | x.dtype      | [K]              | fp8 mode: x * it, rounded to x.dtype, first   |
| w.qweight     | int32          | [Kp/KB, N, W]    | see w4a16_layout.py                           |
| w.scales      | fp16/bf16/fp32 | [Kp/Gk, N]       |                                               |
| w.zeros       | uint8          | [Kp/Gk, N]       | absent: symmetric                             |
| w.perm        | int32          | [Kp]             | act-order gather of x columns                 |
| bias          | fp16/bf16/fp32 | [N]              |                                               |
| y             | x.dtype        | [..., N]         |                                               |
| workspace     | fp32           | [S, M, N]        | split-K partials (S > 1)                      |

Paths (picked per M bucket by w4a16_tune.py): "wgmma" (large M on sm90, w4a16_wgmma.py: async wgmma, the int4
unpacked into its register operand; optional split-K as below), "tma" (large M, w4a16_tma.py), "fused" (this
kernel; with split-K S > 1 each split writes an fp32 partial and the last CTA of a tile, counted by an atomic in
w.locks, sums them in a fixed order: one launch, deterministic, graph-safe; one stream at a time per weight) and
"dequant"
(w4a16_dequant.py: W in x.dtype chunk by chunk, then cuBLAS; for large M where that measures faster).
Rows of x beyond M are zero-filled, never loaded: a clamped M = 1 tile sent all CTAs to the same lines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.w4a16_layout import (SUPPORTED_DTYPES, W4A16Weights, w4a16_can_implement,  # noqa: F401
                                         w4a16_repack)
from lowbit.kernels.quant_act import e4m3_sat, fp8_scale
from lowbit.kernels.w4a16_tune import heuristic, interpreting, select_config, wgmma_ok

# opt-in fp8 activations (A_FP8; 0 = the 16-bit w4a16 GEMM): x quantized to e4m3 as reference.quantize_fp8_ref;
# the wrapper for that mode is w4a16_fp8act.py
A_E4M3_ROW, A_STATIC, A_TOKEN_GROUP, A_E4M3_GROUP = 1, 2, 3, 4


def _unpack_asm(j: int, bf16: bool, scaled: bool) -> str:
    """PTX for chunks 2j, 2j+1 of words $2, $3 (pack=2): $0/$1 = 16-bit pairs (q - z) [* s $6]."""
    sel = j | (j << 4) | ((4 + j) << 8) | ((4 + j) << 12)  # byte j of each word -> bytes 0/1 and 2/3
    if bf16:  # bf16 has 7 mantissa bits: the high nibble must be shifted down to bits 0..3
        body = ("mov.b32 one, 0x3f803f80;\n"
                "lop3.b32 $0, t, 0x000f000f, 0x43004300, 0xea;\n"  # (t & m) | 128.0: 128 + q
                "shr.b32 t, t, 4;\n"
                "lop3.b32 $1, t, 0x000f000f, 0x43004300, 0xea;\n"
                "fma.rn.bf16x2 $0, $0, one, $4;\n"  # + (-(128 + z)): exact
                "fma.rn.bf16x2 $1, $1, one, $5;\n")
        if scaled:
            body += ("mov.b32 nz, 0x80008000;\n"
                     "fma.rn.bf16x2 $0, $0, $6, nz;\n"
                     "fma.rn.bf16x2 $1, $1, $6, nz;\n")
    else:  # fp16: the high nibble lands at 16 * q inside 1024 + 16q, folded by a 1/16 fma
        body = ("mov.b32 one, 0x3c003c00;\n"
                "mov.b32 sixteenth, 0x2c002c00;\n"
                "lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea;\n"  # 1024 + q
                "lop3.b32 $1, t, 0x00f000f0, 0x64006400, 0xea;\n"  # 1024 + 16q
                "fma.rn.f16x2 $0, $0, one, $4;\n"  # - (1024 + z)
                "fma.rn.f16x2 $1, $1, sixteenth, $5;\n")  # 64 + q - (64 + z)
        if scaled:
            body += "mul.rn.f16x2 $0, $0, $6;\nmul.rn.f16x2 $1, $1, $6;\n"
    return "{\n.reg .b32 t, one, sixteenth, nz;\n" + f"prmt.b32 t, $2, $3, {sel};\n" + body + "}"


# PTX strings, data for the kernel: index 8 * scaled + 4 * bf16 + pair
_ASM = tl.constexpr(tuple(_unpack_asm(j, b, s) for s in (False, True) for b in (False, True) for j in range(4)))


@triton.jit
def _unpack_pair(q, ce, co, s, j: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr,
                 SCALED: tl.constexpr, DT: tl.constexpr):
    """Chunks 2j and 2j+1 of the word tile q [BN, W] as DT tiles: (q - z) or (q - z) * s."""
    if USE_ASM:
        if SCALED:
            w0, w1 = tl.inline_asm_elementwise(_ASM[8 + 4 * (ce.dtype == tl.bfloat16) + j], "=r,=r,r,r,r,r,r",
                                               [q, ce, co, s.to(ce.dtype)], dtype=(ce.dtype, ce.dtype),
                                               is_pure=True, pack=2)
        else:
            w0, w1 = tl.inline_asm_elementwise(_ASM[4 * (ce.dtype == tl.bfloat16) + j], "=r,=r,r,r,r,r",
                                               [q, ce, co], dtype=(ce.dtype, ce.dtype), is_pure=True, pack=2)
        return w0, w1
    # portable path (int8, interpreter): exponent trick in fp32, 2^23 + q - (2^23 + z) is exact
    mask: tl.constexpr = (1 << BITS) - 1
    w0 = (((q >> (BITS * 2 * j)) & mask) | 0x4B000000).to(tl.float32, bitcast=True) - ce
    w1 = (((q >> (BITS * (2 * j + 1))) & mask) | 0x4B000000).to(tl.float32, bitcast=True) - ce
    if SCALED:
        w0 = w0 * s
        w1 = w1 * s
    return w0.to(DT), w1.to(DT)


@triton.jit
def _load_group(s_ptr, z_ptr, g, stride_g, offs_n, N, HAS_ZEROS: tl.constexpr):
    """Raw scales and zeros [BN] of group g (masked, not clamped: the loads stay vectorized)."""
    s = tl.load(s_ptr + g * stride_g + offs_n, mask=offs_n < N, other=0.0)
    z = tl.load(z_ptr + g * stride_g + offs_n, mask=offs_n < N, other=0) if HAS_ZEROS else s
    return s, z


@triton.jit
def _consts(s_raw, z_raw, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, USE_ASM: tl.constexpr, DT: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """Scale [BN, 1] fp32 and the unpack's zero terms: the bias to remove, exactly (see _unpack_asm)."""
    s = s_raw.to(tl.float32)[:, None]
    if HAS_ZEROS:
        z = z_raw.to(tl.float32)[:, None]
    else:  # a constant (not derived from s, which would tie s to the MMA operand layout)
        z = tl.full([BLOCK_N, 1], 1 << (BITS - 1), tl.float32)
    if USE_ASM:
        if DT == tl.bfloat16:
            ce = (-128.0 - z).to(DT)
            co = ce
        else:
            ce = (-1024.0 - z).to(DT)
            co = (-64.0 - z).to(DT)
    else:
        ce = 8388608.0 + z
        co = ce
    return s, ce, co


@triton.jit
def _group_consts(s_ptr, z_ptr, g, stride_g, offs_n, N, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  USE_ASM: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr):
    s_raw, z_raw = _load_group(s_ptr, z_ptr, g, stride_g, offs_n, N, HAS_ZEROS)
    return _consts(s_raw, z_raw, BITS, HAS_ZEROS, USE_ASM, DT, BLOCK_N)


@triton.jit
def _cat(a, b):
    """[BN, w] | [BN, w] -> [BN, 2w] along K; with the MMA operand layout this is register renaming."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _unpack_group(q, ce, co, s, j0: tl.constexpr, CPG: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr,
                  SCALED: tl.constexpr, DT: tl.constexpr):
    """Chunks 2*j0 .. 2*j0+CPG-1 of q as one [BN, CPG*W] operand (one group, one tl.dot)."""
    w0, w1 = _unpack_pair(q, ce, co, s, j0, BITS, USE_ASM, SCALED, DT)
    a = _cat(w0, w1)
    if CPG >= 4:
        w2, w3 = _unpack_pair(q, ce, co, s, j0 + 1, BITS, USE_ASM, SCALED, DT)
        a = _cat(a, _cat(w2, w3))
    if CPG == 8:
        w4, w5 = _unpack_pair(q, ce, co, s, j0 + 2, BITS, USE_ASM, SCALED, DT)
        w6, w7 = _unpack_pair(q, ce, co, s, j0 + 3, BITS, USE_ASM, SCALED, DT)
        a = _cat(a, _cat(_cat(w4, w5), _cat(w6, w7)))
    return a


@triton.jit
def _load_x(x_rows, row_ok, perm_ptr, offs_k, Kx, stride_xk, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """x[rows, kernel columns offs_k] as [BM, len], rows >= M zero-filled without a memory access (clamping
    them would send every CTA of an M = 1 launch to the same L2 lines, 16 times over); act-order gathers."""
    if HAS_PERM:
        src = tl.load(perm_ptr + offs_k)
        return tl.load(x_rows + src[None, :] * stride_xk, mask=row_ok & (src >= 0)[None, :], other=0.0)
    if EVEN_K:
        return tl.load(x_rows + offs_k[None, :] * stride_xk, mask=row_ok, other=0.0)
    return tl.load(x_rows + offs_k[None, :] * stride_xk, mask=row_ok & (offs_k < Kx)[None, :], other=0.0)


@triton.jit
def _fp8_x(xt, pqs_ptr, cols, Kx, s, r, A_FP8: tl.constexpr, HAS_PQS: tl.constexpr, UE8M0: tl.constexpr,
           EXACT: tl.constexpr, SOFT: tl.constexpr):
    """x tile [BM, CPG*W] -> its e4m3 values as exact fp16, and the scale: s (static, rows) or the group's [BM].
    q = x * r with r = RN(1 / s); EXACT adds one fma correction, the correctly rounded quotient x / s of the
    reference (Markstein's theorem, IBM J. Res. Dev. 34(1), 1990) wherever |q| <= 448; without it a code can be one
    e4m3 step off where x / s lies within an fp32 ulp of a rounding tie (as quant_act.quantize_tile_rcp)."""
    if A_FP8 == 1:  # already e4m3: widening is exact
        xq = xt.to(tl.float16)
    else:
        xf = xt.to(tl.float32)
        if HAS_PQS:  # smoothing, rounded to x's dtype as the unfused `x * pre_quant_scale` is
            p = tl.load(pqs_ptr + cols, mask=cols < Kx, other=0.0).to(tl.float32)
            xf = xf * p[None, :]
            if SOFT and xt.dtype == tl.bfloat16:  # the interpreter truncates to bf16: round to nearest even here
                u = xf.to(tl.int32, bitcast=True)
                xf = ((u + 0x7FFF + ((u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            else:
                xf = xf.to(xt.dtype).to(tl.float32)
        if A_FP8 == 3:  # token group 128 = this weight group: amax of each row over its 128 columns
            s = fp8_scale(tl.max(tl.abs(xf), axis=1), UE8M0)  # [BM]
            r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
            s2 = s[:, None] + tl.zeros_like(xf)
            r2 = r[:, None] + tl.zeros_like(xf)
        else:
            s2 = s + tl.zeros_like(xf)
            r2 = r + tl.zeros_like(xf)
        if SOFT and EXACT:  # interpreter: numpy's fp32 division is IEEE already
            q = tl.math.div_rn(xf, s2)
        else:
            q = xf * r2
            if EXACT and not SOFT:  # residual x - q s is exact in one fma; beyond 1024 the code saturates anyway
                q = tl.where(tl.abs(q) < 1024.0, tl.fma(tl.fma(-q, s2, xf), r2, q), q)
        xq = e4m3_sat(q, SOFT).to(tl.float16)  # (saturating: the GPU's cvt.rn.satfinite, no clamp)
    return xq, s


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid in grouped order: GROUP_M token tiles take each weight tile in turn."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    rows_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % width) % rows_m, (pid % width) // rows_m


@triton.jit
def w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, xs_ptr, pqs_ptr,
                 M, N, Kx, stride_xm, stride_xk, stride_ym, stride_xs, num_kb, kb_per_split,
                 BITS: tl.constexpr, W: tl.constexpr, GS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
                 SCALE_AFTER: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 GROUP_M: tl.constexpr, A_FP8: tl.constexpr = 0, HAS_PQS: tl.constexpr = False,
                 UE8M0: tl.constexpr = False, EXACT: tl.constexpr = True, SOFT: tl.constexpr = False,
                 X_PAD: tl.constexpr = 0):
    P: tl.constexpr = 32 // BITS
    KB: tl.constexpr = P * W
    ONE_GROUP: tl.constexpr = GS == 0
    CPG: tl.constexpr = P if (ONE_GROUP or GS >= KB) else GS // W  # chunks per group inside a block
    GROUP_PART: tl.constexpr = SCALE_AFTER and not ONE_GROUP
    PREFETCH: tl.constexpr = (not ONE_GROUP) and GS >= KB
    # fp8 activations: e4m3 and (q - 8) are exact in fp16, so the 16-bit MMA computes their products exactly
    DT: tl.constexpr = tl.float16 if A_FP8 != 0 else x_ptr.dtype.element_ty
    # grouped tile order: GROUP_M token tiles reuse a weight tile while it sits in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nc = tl.minimum(offs_n, N - 1)  # loads stay in bounds, stores are masked
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, W)
    offs_g = tl.arange(0, CPG * W)
    if X_PAD > 0:  # fp8, one token tile: quantize only its first BLOCK_M >> X_PAD rows (the wrapper: M = 1)
        offs_m = tl.arange(0, BLOCK_M >> X_PAD)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    row_ok = (offs_m < M)[:, None]
    if X_PAD > 0:
        offs_m = tl.arange(0, BLOCK_M)
    q_ptrs = qw_ptr + offs_nc[:, None] * W + offs_w[None, :]  # [BN, W] words of block 0
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)

    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # y^T tile
    sx = 1.0
    rx = 1.0
    if A_FP8 == 2:  # static per-tensor scale and its correctly rounded reciprocal
        sx = tl.load(xs_ptr)
        rx = tl.math.div_rn(1.0, sx)
    if ONE_GROUP:
        s, ce, co = _group_consts(s_ptr, z_ptr, 0, N, offs_n, N, BITS, HAS_ZEROS, USE_ASM, DT, BLOCK_N)
    if PREFETCH:  # <= 1 group per block: its scales are loaded one block ahead (they come from HBM too)
        s_nxt, z_nxt = _load_group(s_ptr, z_ptr, kb_lo * KB // GS, N, offs_n, N, HAS_ZEROS)
    for kb in range(kb_lo, kb_hi):
        q = tl.load(q_ptrs + kb * N * W)  # [BN, W] int32: 64 contiguous bytes per row
        if PREFETCH:
            s, ce, co = _consts(s_nxt, z_nxt, BITS, HAS_ZEROS, USE_ASM, DT, BLOCK_N)
            s_nxt, z_nxt = _load_group(s_ptr, z_ptr, tl.minimum(kb + 1, kb_hi - 1) * KB // GS, N, offs_n, N,
                                       HAS_ZEROS)
        for gi in tl.static_range(P // CPG):  # groups inside this block
            c0 = kb * KB + gi * CPG * W
            if not ONE_GROUP and not PREFETCH:
                s, ce, co = _group_consts(s_ptr, z_ptr, c0 // GS, N, offs_n, N, BITS, HAS_ZEROS, USE_ASM, DT,
                                          BLOCK_N)
            a = _unpack_group(q, ce, co, s, gi * CPG // 2, CPG, BITS, USE_ASM, not SCALE_AFTER, DT)
            xt = _load_x(x_rows, row_ok, perm_ptr, c0 + offs_g, Kx, stride_xk, HAS_PERM, EVEN_K)  # [BM, CPG*W]
            if A_FP8 == 4:  # e4m3 with per-(token, 128 columns) scales: widening is exact, the scale is loaded
                xt = xt.to(tl.float16)
                sg = tl.load(xs_ptr + offs_m * stride_xs + c0 // 128, mask=offs_m < M, other=0.0)
            elif A_FP8 != 0:
                xt, sg = _fp8_x(xt, pqs_ptr, c0 + offs_g, Kx, sx, rx, A_FP8, HAS_PQS, UE8M0, EXACT, SOFT)
                for _ in tl.static_range(X_PAD):  # zero rows up to the MMA's 16..64 tokens
                    xt = tl.reshape(tl.permute(tl.join(xt, tl.zeros_like(xt)), (2, 0, 1)),
                                    (2 * xt.shape[0], xt.shape[1]))
                    if A_FP8 == 3:
                        sg = tl.reshape(tl.permute(tl.join(sg, tl.zeros_like(sg)), (1, 0)), (2 * sg.shape[0],))
            if A_FP8 == 3 or A_FP8 == 4:  # the group's activation scale [BM] joins the weight scale on the partial
                if GROUP_PART:
                    acc += tl.dot(a, tl.trans(xt)) * (s * sg[None, :])
                else:
                    acc += tl.dot(a, tl.trans(xt)) * sg[None, :]
            elif GROUP_PART:
                acc += tl.dot(a, tl.trans(xt)) * s
            else:
                acc = tl.dot(a, tl.trans(xt), acc)
    if ONE_GROUP and SCALE_AFTER:
        acc = acc * s
    if A_FP8 == 1:  # per-token (or per-tensor: stride 0) activation scale, once per column of y^T
        acc = acc * tl.load(xs_ptr + offs_m * stride_xs, mask=offs_m < M, other=1.0)[None, :]
    elif A_FP8 == 2:
        acc = acc * sx

    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    if SPLIT:  # serial split-K: partial -> workspace; the last split of this tile reduces and stores
        ws_off = (pid_k * M + offs_m)[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(ws_ptr + ws_off, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        lock = lock_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for sp in range(0, tl.num_programs(1)):  # fixed order: deterministic sums
                off = (sp * M + offs_m)[None, :].to(tl.int64) * N + offs_n[:, None]
                total += tl.load(ws_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock, 0)  # ready for the next launch (and CUDA-graph replays)
            _store_y(total, bias_ptr, y_ptr, offs_m, offs_n, offs_nc, stride_ym, mask, HAS_BIAS)
    else:
        _store_y(acc, bias_ptr, y_ptr, offs_m, offs_n, offs_nc, stride_ym, mask, HAS_BIAS)


@triton.jit
def _store_y(acc, bias_ptr, y_ptr, offs_m, offs_n, offs_nc, stride_ym, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_nc).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]  # y^T view of [M, N]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, w: W4A16Weights, bias: torch.Tensor | None) -> None:
    if not isinstance(w, W4A16Weights):
        raise ValueError(f"w4a16_gemm: weights must come from w4a16_repack, got {type(w).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"w4a16_gemm: x dtype {x.dtype} is not supported; supported: {SUPPORTED_DTYPES}")
    if x.dim() < 1 or x.shape[-1] != w.k:
        raise ValueError(f"w4a16_gemm: x shape {tuple(x.shape)} must end in K={w.k}")
    if x.device != w.qweight.device:
        raise ValueError(f"w4a16_gemm: x is on {x.device}, weights on {w.qweight.device}")
    if bias is not None:
        if bias.shape != (w.n,) or bias.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"w4a16_gemm: bias must be [N={w.n}] fp16/bf16/fp32, got {bias.dtype} {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"w4a16_gemm: bias is on {bias.device}, x on {x.device}")


def w4a16_gemm(x: torch.Tensor, w: W4A16Weights, bias: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias) in x.dtype; config (see w4a16_tune.py) overrides the choice by M."""
    _check(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    m = x2.shape[0]
    if bias is not None:
        bias = bias.contiguous()
    if m == 0:
        return x.new_empty((*lead, w.n))
    cfg = config or select_config(w, m, x.dtype, x.device)
    if cfg["path"] == "wgmma":  # large M on sm90 (w4a16_wgmma.py; imported here: it imports this module)
        from lowbit.kernels.w4a16_wgmma import w4a16_wgmma_gemm

        if wgmma_ok(w, x.device):
            return w4a16_wgmma_gemm(x2, w, bias, cfg).reshape(*lead, w.n)
        cfg = heuristic(w, m, x.device)  # a table entry on weights that kernel cannot walk (8-bit, G < 128)
    if cfg["path"] == "tma":  # large M, TMA-fed Triton kernel (w4a16_tma.py)
        from lowbit.kernels.w4a16_tma import tma_supported, w4a16_tma_gemm

        if tma_supported(w):
            return w4a16_tma_gemm(x2, w, bias, cfg).reshape(*lead, w.n)
        cfg = heuristic(w, m, x.device)
    if cfg["path"] == "dequant":  # w4a16_dequant.py (imported here: it imports this module)
        from lowbit.kernels.w4a16_dequant import dequant_matmul

        return dequant_matmul(x2, w, bias, cfg.get("chunks", 1), cfg.get("overlap", False)).reshape(*lead, w.n)
    y = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    return _fused(x2, w, bias, cfg, y).reshape(*lead, w.n)


def _fused(x2, w: W4A16Weights, bias, cfg: dict, y: torch.Tensor, a_fp8: int = 0, xs=None, pqs=None,
           ue8m0: bool = False) -> torch.Tensor:
    """One launch of w4a16_kernel into y [M, N]."""
    m = x2.shape[0]
    block_n, block_m = cfg["BLOCK_N"], cfg["BLOCK_M"]
    num_kb = w.k_pad // w.block_k
    tiles = triton.cdiv(w.n, block_n) * triton.cdiv(m, block_m)
    split = max(1, min(int(cfg.get("SPLIT_K", 1)), num_kb))
    if tiles > w.locks.numel():
        split = 1  # more tiles than split-K counters: large M needs no split
    kb_per_split = triton.cdiv(num_kb, split)
    split = triton.cdiv(num_kb, kb_per_split)  # no empty splits
    ws = torch.empty((split, m, w.n), dtype=torch.float32, device=x2.device) if split > 1 else y
    fp8 = {}
    if a_fp8:
        # row_pad: at M = 1 quantize one row of the 16-row token tile and zero-pad it (join); paid off with the
        # exact division + clamp (H100 4096x7168 static 11.7 vs 13.1 us), loses with the multiply-only quantization
        # (11.2 us unpadded vs 12.1 us padded), so w4a8 turns it off; padding 2..8 rows measured 1.6-3x slower
        pad = ((block_m.bit_length() - 1) if m == 1 and a_fp8 in (A_STATIC, A_TOKEN_GROUP) and cfg.get("row_pad", True)
               else 0)
        fp8 = {"A_FP8": a_fp8, "HAS_PQS": pqs is not None, "UE8M0": ue8m0, "EXACT": cfg.get("exact", True),
               "SOFT": interpreting(), "X_PAD": pad}
    w4a16_kernel[(tiles, split)](
        x2, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales,
        w.perm if w.perm is not None else w.qweight, bias if bias is not None else y, y, ws, w.locks,
        xs if xs is not None else y, pqs if pqs is not None else y,
        m, w.n, w.k, x2.stride(0), x2.stride(1), y.stride(0), xs.stride(0) if xs is not None and xs.numel() > 1 else 0,
        num_kb, kb_per_split, BITS=w.bits, W=w.words, GS=w.gk, HAS_ZEROS=w.zeros is not None,
        HAS_PERM=w.perm is not None, HAS_BIAS=bias is not None, EVEN_K=w.k % w.block_k == 0,
        USE_ASM=cfg.get("asm", True) and w.bits == 4 and not interpreting(), SCALE_AFTER=cfg.get("SCALE_AFTER", True),
        SPLIT=split > 1, BLOCK_N=block_n, BLOCK_M=block_m, GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3), **fp8)
    return y
