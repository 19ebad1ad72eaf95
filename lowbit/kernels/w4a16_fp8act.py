"""The w4a16 kernel with fp8 activations (w4a8 decode): x is quantized to e4m3 as reference.quantize_fp8_ref
says, on its load into w4a16.py's kernel (static / token_group) or beforehand (e4m3_row), and the MMA runs on
exact integers (q - 8) and exact e4m3 values in 16 bits with fp32 accumulation. In-kernel, config "exact" (default
True) rounds x / s as the reference does; w4a8 turns it off (x * RN(1 / s): 2-11 us less at M <= 16 on H100, codes
one e4m3 step off on rare near-ties), and "row_pad" (default True) quantizes only the token row at M = 1.

| mode        | x                 | x_scale (fp32)                   | quantized                          |
|-------------|-------------------|----------------------------------|------------------------------------|
| static      | fp16/bf16/fp32    | [1]                              | in-kernel, e4m3(clamp(x / s))      |
| token_group | fp16/bf16/fp32    | none (per row and 128 columns)   | in-kernel (ue8m0: powers of two)   |
| e4m3_row    | e4m3 [M, K]       | [M] / [M, 1] per token, [1]      | by the caller (quantize_fp8)       |
| e4m3_group  | e4m3 [M, K]       | [M, ceil(K/128)] per token group | by the caller (quantize_fp8)       |
Weights: symmetric int4, group 128, no act-order, from w4a16_repack. M <= FP8_ACT_MAX_M.
"""

from __future__ import annotations

import torch

from lowbit.kernels.w4a16 import A_E4M3_GROUP, A_E4M3_ROW, A_STATIC, A_TOKEN_GROUP, W4A16Weights, _check, _fused
from lowbit.kernels.w4a16_tune import heuristic, select_config

FP8_ACT_MODES = {"e4m3_row": A_E4M3_ROW, "static": A_STATIC, "token_group": A_TOKEN_GROUP, "e4m3_group": A_E4M3_GROUP}
FP8_ACT_MAX_M = 64  # a decode mode: token tiles of at most 64


def fp8act_config(w: W4A16Weights, m: int, device, block_n: int | None = None) -> dict:
    """The w4a16 launch config of this shape and M (tuned table or heuristic), in scale-after mode: the MMA must see
    exact integers and e4m3 values. Large token tiles (or a dequant entry) fall back to the small-M heuristic.
    block_n: wider weight tiles (split-K scaled to keep the CTA count): every N tile quantizes the same x."""
    cfg = select_config(w, m, torch.float16, device)
    if cfg["path"] != "fused" or cfg["BLOCK_M"] > FP8_ACT_MAX_M:
        cfg = heuristic(w, min(m, FP8_ACT_MAX_M), device)
    cfg = dict(cfg, SCALE_AFTER=True)
    if block_n and block_n != cfg["BLOCK_N"]:
        split = round(cfg.get("SPLIT_K", 1) * block_n / cfg["BLOCK_N"])
        cfg.update(BLOCK_N=block_n, SPLIT_K=max(1, min(w.k_pad // w.block_k, split)))
    return cfg


def w4a16_gemm_fp8act(x: torch.Tensor, w: W4A16Weights, mode: str, x_scale: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                      pre_quant_scale: torch.Tensor | None = None, ue8m0: bool = False,
                      config: dict | None = None) -> torch.Tensor:
    """y [M, N] = dequant(fp8(x)) @ W^T (+ bias), fp32 accumulation, for symmetric int4 group-128 weights (w4a8).

    mode "static": x 16/32-bit, x_scale [1] fp32, e4m3(clamp(x / s)) in-kernel; "token_group": x 16/32-bit, scales
    of each row's 128 columns in-kernel (ue8m0: powers of two); "e4m3_row": x already e4m3 with x_scale [M, 1] / [M]
    (per token) or [1] (per tensor); "e4m3_group": x already e4m3 with x_scale [M, ceil(K/128)] (any strides). pre_quant_scale [K] (x.dtype; not with e4m3_row) multiplies x first, rounded
    to x.dtype. Scales equal reference.quantize_fp8_ref's on the same device; codes too with config exact=True (the
    default), else they are e4m3(x * RN(1 / s)), one e4m3 step off where x / s lies within an fp32 ulp of a tie.
    """
    if mode not in FP8_ACT_MODES:
        raise ValueError(f"w4a16_gemm_fp8act: mode {mode!r} is not supported; supported: {tuple(FP8_ACT_MODES)}")
    if not isinstance(w, W4A16Weights):
        raise ValueError(f"w4a16_gemm_fp8act: weights must come from w4a16_repack, got {type(w).__name__}")
    if w.bits != 4 or w.zeros is not None or w.perm is not None or w.gk not in (0, w.block_k) or \
            (w.gk == 0 and w.k > w.block_k):
        raise NotImplementedError(f"w4a16_gemm_fp8act: weights must be symmetric int4, group 128, no act-order; got "
                                  f"{w.bits}-bit, zeros={w.zeros is not None}, act-order={w.perm is not None}, "
                                  f"G={w.group_size}")
    e4m3 = mode.startswith("e4m3")
    allowed = (torch.float8_e4m3fn,) if e4m3 else (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in allowed:
        raise ValueError(f"w4a16_gemm_fp8act: x dtype {x.dtype} is not supported in mode {mode!r}; "
                         f"supported: {allowed}")
    if x.dim() != 2 or x.shape[1] != w.k or x.shape[0] > FP8_ACT_MAX_M:
        raise ValueError(f"w4a16_gemm_fp8act: x must be [M <= {FP8_ACT_MAX_M}, K={w.k}], got {tuple(x.shape)}")
    if x.device != w.qweight.device:
        raise ValueError(f"w4a16_gemm_fp8act: x is on {x.device}, weights on {w.qweight.device}")
    m = x.shape[0]
    want = {"static": (1,), "e4m3_row": (1, m), "e4m3_group": (m * -(-w.k // 128),)}.get(mode)
    if want is not None and (x_scale is None or x_scale.dtype != torch.float32 or x_scale.numel() not in want
                             or x_scale.device != x.device):
        raise ValueError(f"w4a16_gemm_fp8act: mode {mode!r} needs an fp32 x_scale on {x.device} with "
                         f"{' or '.join(map(str, want))} elements, got "
                         f"{None if x_scale is None else (x_scale.dtype, tuple(x_scale.shape), str(x_scale.device))}")
    if pre_quant_scale is not None and (e4m3 or pre_quant_scale.shape != (w.k,) or pre_quant_scale.dtype != x.dtype):
        raise ValueError(f"w4a16_gemm_fp8act: pre_quant_scale must be [K={w.k}] in x's dtype {x.dtype} (not with "
                         f"e4m3 x), got {pre_quant_scale.dtype} {tuple(pre_quant_scale.shape)} in mode {mode!r}")
    out_dtype = out_dtype or (torch.bfloat16 if e4m3 else x.dtype)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4a16_gemm_fp8act: out_dtype {out_dtype} is not supported; supported: fp16, bf16, fp32")
    _check(x.new_empty((0, w.k), dtype=torch.float16), w, bias)  # bias shape / dtype / device
    y = torch.empty((m, w.n), dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    if mode == "e4m3_group":  # row-major [M, groups] (the kernel indexes row * stride + group)
        xs = x_scale.reshape(m, -1).contiguous()
    else:
        xs = x_scale.reshape(-1) if x_scale is not None else None
    pqs = pre_quant_scale.contiguous() if pre_quant_scale is not None else None
    cfg = config or fp8act_config(w, m, x.device)
    return _fused(x, w, bias.contiguous() if bias is not None else None, cfg, y, FP8_ACT_MODES[mode], xs, pqs, ue8m0)
