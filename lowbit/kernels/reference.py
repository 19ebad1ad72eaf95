"""Pure-torch specification of every kernel: packing, dequantization, activation quantization, GEMMs.

The Triton kernels are tested against these; the `reference` backend runs them on any device.
Layouts are the canonical ones of lowbit/scheme.py.

| function                   | in                                              | out                      |
|----------------------------|-------------------------------------------------|--------------------------|
| pack_int32 / unpack_int32  | q [R, C] ints in [0, 2^b) / packed [R, ceil(C/P)] | packed / q [R, C] int32  |
| dequantize_int             | qweight [N, K/P], scales [N, Gn], zeros?, g_idx? | W [N, K] in scales' dtype |
| dequantize_fp8             | weight [N, K] e4m3, weight_scale (see scheme.py) | W [N, K] float32         |
| quantize_fp8_ref           | x [M, K], granularity, static scale?            | xq [M, K] e4m3, scale    |
| w4a16_gemm_ref             | x [M, K] 16-bit + int weights                   | y [M, N] x.dtype         |
| fp8_gemm_ref               | xq, x_scale, wq, w_scale                        | y [M, N] out dtype       |
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_SCALE = 1e-12  # guards all-zero rows/groups


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [R, C] with values in [0, 2^bits) -> int32 [R, ceil(C/P)], P = 32 // bits, LSB-first along C."""
    per = 32 // bits
    rows, cols = q.shape
    words = math.ceil(cols / per)
    padded = torch.zeros(rows, words * per, dtype=torch.int64, device=q.device)
    padded[:, :cols] = q.to(torch.int64) & ((1 << bits) - 1)
    shifts = torch.arange(per, device=q.device, dtype=torch.int64) * bits
    packed = (padded.view(rows, words, per) << shifts).sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 [R, W] -> int32 [R, cols], the inverse of pack_int32."""
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.flatten(-2)[..., :cols].to(torch.int32)


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """Group of each input column: g_idx when given (act-order), else k // G."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(k, device=device) // group_size


def dequantize_int(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
) -> torch.Tensor:
    """W[n, k] = (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]; symmetric: zero = 2^(bits-1)."""
    q = unpack_int32(qweight, bits, k)
    g = group_index(k, group_size, g_idx, q.device)
    s = scales[:, g]
    z = zeros[:, g] if zeros is not None else 2 ** (bits - 1)
    return ((q - z).to(torch.float32) * s.to(torch.float32)).to(scales.dtype)


def expand_block_scales(scale: torch.Tensor, shard_sizes: list[int], k: int, block: tuple[int, int]) -> torch.Tensor:
    """Per-shard block scale grids [sum_s ceil(N_s/BN), ceil(K/BK)] -> per-element [N, K] scales."""
    bn, bk = block
    rows, row0 = [], 0
    for n in shard_sizes:
        nb = math.ceil(n / bn)
        rows.append(scale[row0:row0 + nb].repeat_interleave(bn, dim=0)[:n])
        row0 += nb
    if row0 != scale.shape[0]:
        raise ValueError(f"block scale has {scale.shape[0]} rows; shards {shard_sizes} with BN={bn} need {row0}")
    return torch.cat(rows, dim=0).repeat_interleave(bk, dim=1)[:, :k]


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, granularity: str, shard_sizes: list[int],
                   block: tuple[int, int] | None = None) -> torch.Tensor:
    """fp8 weight [N, K] -> float32, scales multiply (tensor: one per shard; channel: [N]; block: grids)."""
    w = weight.to(torch.float32)
    if granularity == "tensor":
        per_row = torch.cat([weight_scale[i].expand(n) for i, n in enumerate(shard_sizes)])
        return w * per_row[:, None]
    if granularity == "channel":
        return w * weight_scale.reshape(-1, 1).to(torch.float32)
    if granularity == "block":
        return w * expand_block_scales(weight_scale.to(torch.float32), shard_sizes, w.shape[1], block)
    raise ValueError(f"fp8 weight granularity {granularity!r} is not supported; supported: tensor, channel, block")


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(x)))


def quantize_fp8_ref(
    x: torch.Tensor,
    granularity: str,
    scale: torch.Tensor | None = None,
    group_size: int = 128,
    ue8m0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] e4m3, scale) with x ~= xq * scale.

    tensor_static: scale given ([] or [1]); tensor_dynamic: scale [1] = amax / 448;
    token: scale [M, 1]; token_group: scale [M, ceil(K/G)] (ue8m0: rounded up to a power of two).
    Values saturate at +-448.
    """
    xf = x.to(torch.float32)
    if granularity == "tensor_static":
        if scale is None:
            raise ValueError("tensor_static activation quantization needs a scale")
        s = scale.reshape(1).to(torch.float32)
        return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s
    if granularity == "tensor_dynamic":
        s = (xf.abs().amax() / FP8_MAX).clamp(min=FP8_MIN_SCALE).reshape(1)
        return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s
    if granularity == "token":
        s = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
        return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s
    if granularity == "token_group":
        m, k = xf.shape
        ng = math.ceil(k / group_size)
        padded = torch.nn.functional.pad(xf, (0, ng * group_size - k)).view(m, ng, group_size)
        s = (padded.abs().amax(dim=-1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)  # [M, ng]
        if ue8m0:
            s = _pow2_ceil(s)
        q = (padded / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, -1)[:, :k]
        return q.to(FP8_DTYPE), s
    raise ValueError(
        f"activation granularity {granularity!r} is not supported; supported: tensor_static, tensor_dynamic, token, token_group"
    )


def dequantize_fp8_act(xq: torch.Tensor, scale: torch.Tensor, granularity: str, group_size: int = 128) -> torch.Tensor:
    xf = xq.to(torch.float32)
    if granularity == "token_group":
        return xf * scale.repeat_interleave(group_size, dim=1)[:, : xf.shape[1]]
    return xf * scale.reshape(-1, 1) if scale.numel() > 1 else xf * scale.reshape(())


def w4a16_gemm_ref(x: torch.Tensor, qweight, scales, zeros, g_idx, bits: int, group_size: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W dequantized in float32; output in x.dtype."""
    w = dequantize_int(qweight, scales.to(torch.float32), zeros, g_idx, bits, group_size, x.shape[-1])
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def fp8_gemm_ref(xq: torch.Tensor, x_scale: torch.Tensor, x_granularity: str, w: torch.Tensor,
                 out_dtype: torch.dtype, bias: torch.Tensor | None = None, group_size: int = 128) -> torch.Tensor:
    """y = dequant(xq) @ w^T with w already dequantized to float32 [N, K]."""
    y = dequantize_fp8_act(xq, x_scale, x_granularity, group_size) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)
