"""w4a8: int4 group-wise weights (G = 128, symmetric) x fp8 e4m3 activations, on the fp8 tensor cores (sm89+).

Per K-group g of 128 columns, with q - 8 in [-8, 7] exact in e4m3:
    acc[m, n] += (xq[m, g] @ (q[n, g] - 8)^T) * sa[m, g] * scale[n, g]        (fp32 accumulation)
    y = acc * sa[m] (per-tensor / per-token activations) + bias
Activations: tensor_static (W4A8-AWQ: one input_scale, max'ed over fused shards by the caller) or
token_group 128 (dynamic; DeepSeek W4AFP8); tensor_dynamic and token work too.

| tensor  | canonical (lowbit/scheme.py)                          | W4A8Weights (what the kernels read)                         |
|---------|-------------------------------------------------------|-------------------------------------------------------------|
| qweight | int32 [N, ceil(K/8)], LSB-first along K, q in [0, 16) | int32 [ceil(K/128), N, 16]: K-block-major, so a [BLOCK_N x 128] tile is one contiguous run; K padded with q = 8 (zero) |
| scales  | fp16/bf16/fp32 [N, ceil(K/128)]                      | fp32 [N, ceil(K/128)], rows = arange(N) for the shared kernels |

Candidates (`pick_candidate`, thresholds in configs/w4a8_select.json measured on H200):
| name    | path                                                                                     |
|---------|------------------------------------------------------------------------------------------|
| small_m | fp8_small_m.py with W_INT4: int4 -> e4m3 in registers, split-K, x quantized in-kernel     |
| triton  | quantize_fp8, then fp8_block.py with W_INT4 (int4 -> e4m3 in registers)                   |
| dequant | int4 -> e4m3 weight scratch [N, K] (one pass), then the fp8 block GEMM with 1 x 128 weight scales |
| dequant_cublas | the same scratch, then cuBLAS F.scaled_mm BlockWise1x128 x BlockWise1x128 (K % 128 == 0, M >= 16); |
|         | per-tensor / per-token activation scales enter as constant 1 x 128 block scales (the same math)  |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.kernels import fp8_block, fp8_small_m
from lowbit.kernels.fp8_block import BLOCK_K
from lowbit.kernels.fp8_gemm import _device_ok, load_config
from lowbit.kernels.quant_act import GRANULARITIES, quantize_fp8

GROUP_SIZE = 128
CANDIDATES = ("small_m", "triton", "dequant", "dequant_cublas")
_DEFAULT_SELECT = {"small_m_max": 16, "dequant_min_m": 17, "dequant_cublas_min_m": 17}
CUBLAS_MIN_M = 16  # as fp8_gemm.CUBLAS_BLOCK_MIN_M (1 x 128 x 1 x 128 probed at M = 16, 32, 64, 128)
_SMALL_MODES = {"tensor_static": fp8_small_m.A_STATIC, "token_group": fp8_small_m.A_DYN_GROUP,
                "token": fp8_small_m.A_DYN_TOKEN, "tensor_dynamic": fp8_small_m.A_DYN_TENSOR}


@dataclass
class W4A8Weights:
    qweight: torch.Tensor  # [ceil(K/128), N, 16] int32
    scales: torch.Tensor  # [N, ceil(K/128)] fp32
    scales_cm: torch.Tensor  # the same values column-major (strides (1, N)): cuBLAS 1 x 128 weight scales
    rows: torch.Tensor  # [N] int32 = arange(N)
    counters: torch.Tensor  # [ceil(N/16)] int32 zeros (split-K tickets)
    n: int
    k: int


@triton.jit
def _e4m3_byte(q):
    """int4 codes q in [0, 16) -> the e4m3 bits of q - 8 (exact), as int32 in [0, 256)."""
    return (q - 8).to(tl.float32).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)


@triton.jit
def int4_to_fp8_kernel(w_ptr, out_ptr, N, stride_wk, stride_wn, stride_on, BLOCK_N: tl.constexpr):
    """[ceil(K/128), N, 16] words -> e4m3 [N, ceil(K/128) * 128] written as int32 words (4 codes each): word w
    of a row holds k = 8w..8w+7, so its low / high halves become output words 2w / 2w + 1 with no shuffle."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.program_id(1)
    offs_w = tl.arange(0, 16)
    mask = offs_n[:, None] < N
    words = tl.load(w_ptr + kb * stride_wk + offs_n[:, None] * stride_wn + offs_w[None, :], mask=mask, other=0)
    lo = tl.zeros((BLOCK_N, 16), tl.int32)
    hi = tl.zeros((BLOCK_N, 16), tl.int32)
    for j in tl.static_range(4):
        lo |= _e4m3_byte((words >> (4 * j)) & 15) << (8 * j)
        hi |= _e4m3_byte((words >> (4 * j + 16)) & 15) << (8 * j)
    out = tl.reshape(tl.join(lo, hi), (BLOCK_N, 32))  # [BN, 32] int32 = 128 e4m3 codes in K order
    offs_o = kb * 32 + tl.arange(0, 32)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_o[None, :], out, mask=mask)


def w4a8_can_implement(group_size: int, n: int, k: int, device) -> tuple[bool, str]:
    if group_size != GROUP_SIZE:
        return False, f"w4a8 group size {group_size} is not supported; supported: {GROUP_SIZE}"
    if n <= 0 or k <= 0:
        return False, f"empty weight N={n}, K={k}"
    return _device_ok(device)


def w4a8_repack(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int) -> W4A8Weights:
    """Canonical symmetric int4 (scheme.py) -> W4A8Weights, once at load."""
    if group_size != GROUP_SIZE:
        raise ValueError(f"w4a8_repack: group size {group_size} is not supported; supported: {GROUP_SIZE}")
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, math.ceil(k / 8)):
        raise ValueError(f"w4a8_repack: qweight must be int32 [N, ceil(K/8)] = [{n}, {math.ceil(k / 8)}], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    nkb = math.ceil(k / GROUP_SIZE)
    if tuple(scales.shape) != (n, nkb) or not scales.is_floating_point():
        raise ValueError(f"w4a8_repack: scales must be float [N, ceil(K/128)] = [{n}, {nkb}], "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    dev = qweight.device
    shifts = torch.arange(8, device=dev, dtype=torch.int32) * 4
    q = ((qweight.unsqueeze(-1) >> shifts) & 15).reshape(n, -1)[:, :k]  # [N, K] in [0, 16)
    q = torch.nn.functional.pad(q, (0, nkb * GROUP_SIZE - k), value=8).to(torch.int64)  # padding is zero weight
    words = (q.view(n, -1, 8) << shifts.to(torch.int64)).sum(-1)  # [N, nkb * 16], LSB-first
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    packed = words.view(n, nkb, 16).permute(1, 0, 2).contiguous()
    scales = scales.to(torch.float32).contiguous()
    return W4A8Weights(packed, scales, scales.t().contiguous().t(), torch.arange(n, dtype=torch.int32, device=dev),
                       torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=dev), n, k)


def int4_to_fp8(w: W4A8Weights) -> torch.Tensor:
    """e4m3 [N, ceil(K/128) * 128] = q - 8 (a scratch weight for the dequant candidate)."""
    nkb = w.qweight.shape[0]
    out = torch.empty((w.n, nkb * BLOCK_K), dtype=torch.float8_e4m3fn, device=w.qweight.device)
    out32 = out.view(torch.int32)  # [N, nkb * 32]
    block_n = 64
    int4_to_fp8_kernel[(triton.cdiv(w.n, block_n), nkb)](w.qweight, out32, w.n, w.qweight.stride(0),
                                                         w.qweight.stride(1), out32.stride(0), BLOCK_N=block_n,
                                                         num_warps=4)
    return out


def cublas_ok(w: W4A8Weights, m: int) -> bool:
    return (w.qweight.is_cuda and w.k % 128 == 0 and w.n % 16 == 0 and m >= CUBLAS_MIN_M
            and hasattr(torch.nn.functional, "scaled_mm"))


def pick_candidate(w: W4A8Weights, m: int) -> str:
    sel = {**_DEFAULT_SELECT, **load_config("w4a8_select")}
    if m <= sel["small_m_max"] or not w.qweight.is_cuda:
        return "small_m" if m <= fp8_small_m.MAX_M else "triton"
    if m >= sel["dequant_cublas_min_m"] and cublas_ok(w, m):
        return "dequant_cublas"
    return "dequant" if m >= sel["dequant_min_m"] else "triton"


def _dequant_cublas(xq, xs, group: bool, w: W4A8Weights, bias, out_dtype) -> torch.Tensor:
    F = torch.nn.functional
    m, kb = xq.shape[0], w.k // BLOCK_K
    if not cublas_ok(w, m):
        raise ValueError(f"w4a8_linear: dequant_cublas needs K % 128 == 0, N % 16 == 0 and M >= {CUBLAS_MIN_M}; "
                         f"got M={m}, N={w.n}, K={w.k}")
    if not group:  # [1] or [M, 1] -> [M, K/128] column-major, every block of a row with the row's scale
        xs = xs.reshape(1, -1).expand(kb, m).contiguous().t()
    elif xs.stride(0) != 1:
        xs = xs.t().contiguous().t()
    y = F.scaled_mm(xq, int4_to_fp8(w).t(), xs, F.ScalingType.BlockWise1x128, w.scales_cm,
                    F.ScalingType.BlockWise1x128, output_dtype=out_dtype)
    return y if bias is None else y.add_(bias)


def w4a8_linear(x: torch.Tensor, w: W4A8Weights, act_granularity: str, input_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, ue8m0: bool = False,
                candidate: str | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias) with x quantized to e4m3 per act_granularity (token_group: G = 128)."""
    if act_granularity not in GRANULARITIES:
        raise ValueError(f"w4a8_linear: activation granularity {act_granularity!r} is not supported; "
                         f"supported: {GRANULARITIES}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4a8_linear: x dtype {x.dtype} is not supported; supported: fp16, bf16, fp32")
    if x.shape[-1] != w.k:
        raise ValueError(f"w4a8_linear: x has K={x.shape[-1]}, the weight K={w.k}")
    if act_granularity == "tensor_static" and (input_scale is None or input_scale.numel() != 1):
        raise ValueError("w4a8_linear: tensor_static activations need a one-element input_scale (max over shards)")
    if bias is not None and bias.shape != (w.n,):
        raise ValueError(f"w4a8_linear: bias shape {tuple(bias.shape)}, expected ({w.n},)")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cand = candidate or pick_candidate(w, m)
    if cand not in CANDIDATES:
        raise ValueError(f"w4a8_linear: candidate {cand!r} is not supported; supported: {CANDIDATES}")
    if cand == "small_m":
        mode, xs = _SMALL_MODES[act_granularity], input_scale
        if act_granularity in ("token", "tensor_dynamic") and m * w.k > 32768:
            x2, xs = quantize_fp8(x2, act_granularity)
            mode = fp8_small_m.A_FP8_ROW
        cfg = load_config("w4a8_small_m").get(f"{w.n}x{w.k}")
        y = fp8_small_m.fp8_small_m(x2, xs, mode, w.qweight, w.scales, w.rows, w.counters, w.n, w.k, w_int4=True,
                                    bias=bias, out_dtype=out_dtype, ue8m0=ue8m0, config=tuple(cfg) if cfg else None)
        return y.reshape(*lead, w.n)
    xq, xs = quantize_fp8(x2, act_granularity, input_scale, GROUP_SIZE, ue8m0, column_major_scales=True)
    group = act_granularity == "token_group"
    if cand == "triton":
        cfg = fp8_block.block_config(m, load_config("w4a8_block"))
        y = fp8_block.fp8_block_gemm(xq, xs, group, w.qweight, w.scales, w.rows, w.n, w.k, w_int4=True, bias=bias,
                                     out_dtype=out_dtype, config=cfg)
    elif cand == "dequant_cublas":
        y = _dequant_cublas(xq, xs, group, w, bias, out_dtype)
    else:
        w8 = int4_to_fp8(w)
        tuned = load_config("fp8_block")
        y = fp8_block.fp8_block_gemm(xq, xs, group, w8, w.scales, w.rows, w.n, w.k, bias=bias, out_dtype=out_dtype,
                                     config=fp8_block.block_config(m, tuned), tma=bool(tuned.get("tma", False)))
    return y.reshape(*lead, w.n)
