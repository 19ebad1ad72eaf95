"""RMSNorm (with the residual add before it) in one pass, optionally quantizing its output to fp8 e4m3 in the same
pass, for the linear layer that follows (qkv_proj after input_layernorm, gate_up_proj after post_attention_layernorm).

Math (layers/norm.py, as transformers computes it; DT = x's dtype, every arrow a rounding to DT):
    x   <- x + residual                     (residual given: also written out, it is the next layer's residual)
    h    = DT(x * rsqrt(mean(x^2) + eps))   fp32 inside
    h    = DT(weight * h)                   weight in DT
    h    = DT(h * pre_quant_scale)          optional (AWQ smoothing, as quant_act.py)
then, for the quantizing forms, h is quantized exactly as quant_act.quantize_fp8 quantizes a 16-bit tensor (same
scale rule, same e4m3 rounding), or fake-quantized (fake=True: xq * s rounded to DT, w4a8.py's "w16" operand).
mean(x^2) is a tree sum here and a different order in torch, and torch's rsqrt may differ in the last fp32 bit, so h
can differ from the torch module by one DT ulp; the quantizing forms quantize the very h that rms_norm returns.

Why: unfused, a 16-bit [M, K] h is written by the norm and read back by quantize_fp8 (bytes per element: read x, r 4,
write x 2, write h 2; read h 2, write xq 1 = 11); fused it is 4 + 2 + 1 = 7, and torch's own RMSNorm runs ~8 kernels
with fp32 temporaries. tensor_dynamic (one amax over the whole tensor before any code) is not fused: a caller
normalises first and quantizes in a pass of its own.

Measured (H100, python -m bench.kernels act_quant --quick --ms 16,256,2048,8192, interleaved CUDA-graph replay,
bf16, bench/results/h100.json act_quant_norm): add + RMSNorm at 8192 x 7168 159 us, 99% of copy bandwidth (the torch
ops 1002 us; at M = 1 2.7 vs 14.9 us); add + RMSNorm + quantize 143-148 us, 93-96% of copy, against 219-229 us for
this norm then quantize_fp8 (1.51-1.56x; 1.35-1.40x at M = 2048). A norm and Llama-3-70B's gate_up_proj
(57344 x 8192) through layers/norm.norm_linear against the torch norm then the layer: 1.13-1.18x (fp8 block) and
1.07-1.16x (w4a8) at M = 256..8192, 1.03-1.12x for bf16 weights.

One program normalises BLOCK_M whole rows held in registers (K <= MAX_K); at decode (up to SPLIT_MAX_M rows) a
program sums the squares of one whole row and writes one column slice of it (COLS), so a row's work spreads over SMs:
| tensor   | dtype          | shape                     | notes                                                   |
|----------|----------------|---------------------------|---------------------------------------------------------|
| x        | fp16/bf16/fp32 | [M, K]                    | unit stride along K                                     |
| residual | x.dtype        | [M, K]                    | optional; x + residual written to res_out [M, K]        |
| weight   | x.dtype        | [K]                       | the norm's weight                                       |
| y        | x.dtype / e4m3 | [M, K]                    | h (OUT 0), its e4m3 codes (OUT 1-3) or fake-quantized h |
| scale    | fp32           | [1] / [M, 1] / [M, K/G]   | tensor_static (given) / token / token_group (K/G rounded |
|          |                |                           | up; row- or column-major)                               |
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.quant_act import FP8, _check as _check_quant, _out, _pqs, _rounded, empty_group_scales, fp8_scale, \
    quantize_tile, soft_cast

MAX_K = 16384  # a row lives in registers; wider rows are normalised by the torch module
ROW_ELEMS = 8192  # elements per program: short rows are batched so every program keeps 16-byte loads in flight
FEW_ROWS = 128  # every form with fewer programs than this runs one row per program on 16 / 32 warps (H100, M = 1..16,
# add + RMSNorm + fake-quantize: K = 4096 3.1 -> 2.2 us on 4 -> 16 warps, K = 7168 3.5 -> 2.7-3.0 us on 8 -> 32; the
# 16-bit norm alone 1.7-2.1 us, no faster on more warps), or, up to SPLIT_MAX_M rows, in column slices (H100, bf16,
# add + RMSNorm at M = 1 / 16, us, one row per program -> slices: K = 7168 plain 2.10 -> 2.08 / 2.44 -> 2.38, fake-
# quantized tensor_static 2.72 -> 2.40 / 3.02 -> 2.80, token_group 2.97 -> 2.53 / 3.23 -> 2.96; K = 4096 1.83 -> 1.73 /
# 2.34 -> 2.04, 2.31 -> 2.02 / 2.52 -> 2.33, 2.46 -> 2.15 / 2.62 -> 2.44; at M = 64 slices were 0.1-0.9 us slower)
SPLIT_MAX_M = 16  # up to this many rows each row's columns go to programs of SPLIT_COLS (a multiple of the group) ...
SPLIT_COLS = 1024  # ... on SPLIT_WARPS warps; every program sums the squares of the whole row (and, for token, takes
SPLIT_WARPS = 8  # the amax of its whole h) itself, and quantizes only its slice
FUSED_GRANULARITIES = ("tensor_static", "token", "token_group")
_OUT = {None: 0, "tensor_static": 1, "token": 2, "token_group": 3}


@triton.jit
def rms_norm_kernel(
    x_ptr, r_ptr, ro_ptr, w_ptr, pqs_ptr, y_ptr, s_ptr,  # see the table above; s: the scale in / out
    M, K, stride_xm, stride_rm, stride_om, stride_ym, stride_sm, stride_sg, eps,
    RESID: tl.constexpr, PQS: tl.constexpr, OUT: tl.constexpr,  # OUT 0 h, 1 tensor_static, 2 token, 3 token_group
    DEQ: tl.constexpr, G: tl.constexpr, UE8M0: tl.constexpr, SOFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    COLS: tl.constexpr = 0,  # > 0: program (i, j) writes only columns [j * COLS, (j + 1) * COLS) of its rows
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    rows = offs_m[:, None].to(tl.int64)
    DT = x_ptr.dtype.element_ty
    x = _load_x(x_ptr, r_ptr, ro_ptr, rows, offs_k, mask, stride_xm, stride_rm, stride_om, RESID, COLS == 0, DT)
    inv = tl.math.rsqrt(tl.sum(x * x, axis=1) / K + eps)  # [BLOCK_M]
    if COLS > 0:  # the whole row gave the sum of squares; the rest is this program's column slice (reloaded: L1/L2)
        if OUT == 2:  # the token scale: the amax of the whole row's h
            row_amax = tl.max(tl.abs(_h(x, inv, w_ptr, pqs_ptr, offs_k, K, PQS, DT)), axis=1)
        offs_k = tl.program_id(1) * COLS + tl.arange(0, COLS)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        x = _load_x(x_ptr, r_ptr, ro_ptr, rows, offs_k, mask, stride_xm, stride_rm, stride_om, RESID, True, DT)
    h = _h(x, inv, w_ptr, pqs_ptr, offs_k, K, PQS, DT)
    y_ptrs = y_ptr + rows * stride_ym + offs_k[None, :]
    if OUT == 0:
        tl.store(y_ptrs, h.to(DT), mask=mask)
    elif OUT == 3:
        BLOCK_W: tl.constexpr = COLS if COLS > 0 else BLOCK_K  # (COLS a multiple of G)
        NG: tl.constexpr = BLOCK_W // G
        h3 = tl.reshape(h, (BLOCK_M, NG, G))
        s = fp8_scale(tl.max(tl.abs(h3), axis=2), UE8M0)  # [BLOCK_M, NG]
        offs_g = tl.program_id(1) * (BLOCK_W // G) + tl.arange(0, NG)
        tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_g[None, :] * stride_sg, s,
                 mask=mask_m[:, None] & (offs_g[None, :] * G < K))
        m3 = tl.reshape(mask, (BLOCK_M, NG, G))
        q = quantize_tile(tl.where(m3, h3, 1.0), s[:, :, None], SOFT)
        out = tl.reshape(_out(q, s[:, :, None], y_ptr, DEQ, SOFT), (BLOCK_M, BLOCK_W))
        tl.store(y_ptrs, out, mask=mask)
    else:
        if OUT == 1:
            s = tl.load(s_ptr) + tl.zeros([BLOCK_M], tl.float32)
        else:
            if COLS > 0:
                s = fp8_scale(row_amax, False)
            else:
                s = fp8_scale(tl.max(tl.abs(h), axis=1), False)
            tl.store(s_ptr + offs_m * stride_sm, s, mask=mask_m & (tl.program_id(1) == 0))
        q = quantize_tile(tl.where(mask, h, 1.0), s[:, None], SOFT)
        tl.store(y_ptrs, _out(q, s[:, None], y_ptr, DEQ, SOFT), mask=mask)


@triton.jit
def _load_x(x_ptr, r_ptr, ro_ptr, rows, offs_k, mask, stride_xm, stride_rm, stride_om, RESID: tl.constexpr,
            STORE: tl.constexpr, DT: tl.constexpr):
    """The x tile [rows, offs_k] as fp32; RESID: DT(x + residual), written to res_out where STORE."""
    x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if RESID:
        x = _rounded(x + tl.load(r_ptr + rows * stride_rm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32), DT)
        if STORE:
            tl.store(ro_ptr + rows * stride_om + offs_k[None, :], x.to(DT), mask=mask)
    return x


@triton.jit
def _h(x, inv, w_ptr, pqs_ptr, offs_k, K, PQS: tl.constexpr, DT: tl.constexpr):
    """The normalised row(s): DT(DT(x * inv) * weight) [* pre_quant_scale, rounded], fp32 values."""
    h = _rounded(x * inv[:, None], DT)
    h = _rounded(h * tl.load(w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :], DT)
    if PQS:
        h = _rounded(h * tl.load(pqs_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :], DT)
    return h


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels take this input (else the torch module normalises): a 2-D 16/32-bit x on a GPU (or on the
    CPU under the Triton interpreter), rows of at most MAX_K with unit stride, weight [K] of x's dtype."""
    return (x.dim() == 2 and (x.is_cuda or soft_cast()) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 0 < x.shape[1] <= MAX_K and x.stride(1) == 1 and weight.dtype == x.dtype
            and tuple(weight.shape) == (x.shape[1],))


def _check(x, weight, residual, what):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{what}: x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{what}: x dtype {x.dtype} is not supported; supported: fp16, bf16, fp32")
    k = x.shape[1]
    if not 0 < k <= MAX_K:
        raise ValueError(f"{what}: K = {k} is not supported; supported: 1 .. {MAX_K} (a row in registers)")
    if tuple(weight.shape) != (k,) or weight.dtype != x.dtype:
        raise ValueError(f"{what}: weight must be [K={k}] {x.dtype}, got {weight.dtype} {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{what}: residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
                         f"{tuple(residual.shape)}")


def _launch(x, weight, eps, residual, pqs, y, s, out, deq=False, group_size=128, ue8m0=False):
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    res_out = None
    if residual is not None:
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if m == 0:
        return res_out
    block_k = max(16, triton.next_power_of_2(k), group_size if out == 3 else 16)
    block_m = min(max(1, ROW_ELEMS // block_k), triton.next_power_of_2(m))
    num_warps = max(4, min(16, block_m * block_k // 1024))
    cols = 0
    # decode: one row per program, the same launch for every form (plain included), so that each form sums the squares
    # in the same order and the quantizing forms quantize the very h that rms_norm returns
    if triton.cdiv(m, block_m) < FEW_ROWS:
        block_m, num_warps = 1, 16 if block_k <= 4096 else 32
        if m <= SPLIT_MAX_M and k > SPLIT_COLS:
            cols, num_warps = max(SPLIT_COLS, group_size), SPLIT_WARPS
    s_arg = s if s is not None else x
    rms_norm_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, cols) if cols else 1)](
        x, residual if residual is not None else x, res_out if res_out is not None else x, weight.contiguous(),
        pqs if pqs is not None else weight, y, s_arg, m, k, x.stride(0),
        residual.stride(0) if residual is not None else 0, res_out.stride(0) if res_out is not None else 0,
        y.stride(0), s.stride(0) if out in (2, 3) else 0, s.stride(1) if out == 3 else 0, float(eps),
        RESID=residual is not None, PQS=pqs is not None, OUT=out, DEQ=deq, G=group_size, UE8M0=ue8m0,
        SOFT=soft_cast(), BLOCK_M=block_m, BLOCK_K=block_k, COLS=cols, num_warps=num_warps)
    return res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [M, K] -> RMSNorm(x) [M, K]; with residual: x + residual first, returns (RMSNorm(x + r), x + r)."""
    _check(x, weight, residual, "rms_norm")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = _launch(x, weight, eps, residual, None, y, None, 0)
    return y if residual is None else (y, res_out)


def rms_norm_quantize_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, granularity: str,
                          scale: torch.Tensor | None = None, group_size: int = 128, ue8m0: bool = False,
                          column_major_scales: bool = False, residual: torch.Tensor | None = None,
                          pre_quant_scale: torch.Tensor | None = None, fake: bool = False):
    """quant_act.quantize_fp8(RMSNorm(x [+ residual]) [* pre_quant_scale], granularity, ...) in one pass.

    Returns (xq [M, K] e4m3, scale, x + residual or None); fake=True: xq is the fake-quantized h in x's dtype (xq *
    scale rounded, quant_act.fake_quantize_act_fp8's values). granularity: tensor_static (scale: the one-element input
    scale), token, token_group (group_size a power of two >= 16; ue8m0 power-of-two scales); tensor_dynamic is not
    fused (its amax spans the tensor)."""
    what = "rms_norm_quantize_fp8"
    _check(x, weight, residual, what)
    if granularity not in FUSED_GRANULARITIES:
        raise ValueError(f"{what}: granularity {granularity!r} is not supported; supported: {FUSED_GRANULARITIES} "
                         f"(tensor_dynamic: rms_norm, then quantize_fp8)")
    _check_quant(x, granularity, scale, group_size, what)  # the scale and group size, as quantize_fp8 checks them
    if ue8m0 and granularity != "token_group":
        raise ValueError(f"{what}: ue8m0 scales apply to token_group only")
    m, k = x.shape
    pqs = _pqs(pre_quant_scale, x, k, what)
    y = torch.empty((m, k), dtype=x.dtype if fake else FP8, device=x.device)
    if granularity == "tensor_static":
        s = scale.reshape(1).to(torch.float32)
    elif granularity == "token":
        s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    else:
        s = empty_group_scales(m, k, group_size, column_major_scales, x.device)
    res_out = _launch(x, weight, eps, residual, pqs, y, s, _OUT[granularity], fake, group_size, ue8m0)
    return y, s, res_out
