"""Round-to-nearest integer quantization: quantization parameters, quantize, dequantize, pack.

The grid is the one GPTQ (Frantar et al. 2022) and compressed-tensors use, so checkpoints agree:
  symmetric:  scale = absmax / ((2^b - 1) / 2), zero = 2^(b-1)     (int4: absmax / 7.5, zero 8)
  asymmetric: scale = (max - min) / (2^b - 1),  zero = round(-min / scale)
with min <= 0 <= max, q = clamp(round(w / scale) + zero, 0, 2^b - 1), W ~= (q - zero) * scale.
w / scale is computed in float32 (the nearest grid point) unless `quotient_dtype` is given: the RTN scheme
passes the checkpoint's 16-bit dtype, so, like compressed-tensors' quantize (hence llm-compressor), it
rounds the bf16/fp16 quotient of the 16-bit weight and scale and writes the same int4 values as
llm-compressor's round-to-nearest; in fp32 ~0.8% of SmolLM2's int4 values differ at near-ties, which
moves its perplexity by 3.5% (bench/results/quality.md). GPTQ and AWQ keep the fp32 quotient.
Groups run along K in column order; the last group is partial when G does not divide K.
`clip` [N, ng] shrinks each group's range (AWQ's clipping search); `scale_dtype` rounds scales to what
the checkpoint stores (fp16/bf16) *before* rounding the weights, so the file dequantizes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.base import QuantizedModule
from lowbit.kernels.reference import pack_int32
from lowbit.scheme import QuantScheme


@dataclass
class IntQuant:
    q: torch.Tensor  # [N, K] int32 in [0, 2^b)
    scales: torch.Tensor  # [N, ng] float32
    zeros: torch.Tensor | None  # [N, ng] int32; None when symmetric
    g_idx: torch.Tensor | None = None  # [K] int32, only for act-order without static groups


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, ng, G], zero-padded at the end of a partial last group (0 is always in range)."""
    n, k = w.shape
    ng = math.ceil(k / group)
    return torch.nn.functional.pad(w, (0, ng * group - k)).view(n, ng, group)


def round_scales(scales: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    if scale_dtype is not None and scale_dtype != torch.float32:
        scales = scales.to(scale_dtype).float()
    return torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero group: any scale works


def compute_qparams(w: torch.Tensor, bits: int, group: int, symmetric: bool, clip: torch.Tensor | None = None,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [N, K] -> scales [N, ng] float32, zeros [N, ng] int32 (None when symmetric)."""
    g = _grouped(w.float(), group)
    maxq = 2**bits - 1
    if symmetric:
        absmax = g.abs().amax(dim=-1)
        if clip is not None:
            absmax = absmax * clip
        return round_scales(absmax / (maxq / 2), scale_dtype), None
    lo = g.amin(dim=-1).clamp(max=0)
    hi = g.amax(dim=-1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scales = round_scales((hi - lo) / maxq, scale_dtype)
    zeros = torch.round(-lo / scales).clamp(0, maxq).to(torch.int32)
    return scales, zeros


def _expand(p: torch.Tensor, k: int, group: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Per-group [N, ng] -> per-column [N, K]."""
    if g_idx is not None:
        return p[:, g_idx.long()]
    return p.repeat_interleave(group, dim=1)[:, :k]


def quantize_int(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int,
                 g_idx: torch.Tensor | None = None, quotient_dtype: torch.dtype | None = None) -> torch.Tensor:
    k = w.shape[1]
    s = _expand(scales, k, group, g_idx)
    z = _expand(zeros, k, group, g_idx).float() if zeros is not None else 2 ** (bits - 1)
    qd = quotient_dtype or torch.float32
    return (torch.round(w.to(qd) / s.to(qd)).float() + z).clamp(0, 2**bits - 1).to(torch.int32)


def dequantize_int(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int,
                   g_idx: torch.Tensor | None = None) -> torch.Tensor:
    k = q.shape[1]
    z = _expand(zeros, k, group, g_idx) if zeros is not None else 2 ** (bits - 1)
    return (q - z).float() * _expand(scales, k, group, g_idx)


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool, clip: torch.Tensor | None = None,
        scale_dtype: torch.dtype | None = None, quotient_dtype: torch.dtype | None = None) -> IntQuant:
    scales, zeros = compute_qparams(w, bits, group, symmetric, clip, scale_dtype)
    return IntQuant(quantize_int(w, scales, zeros, bits, group, quotient_dtype=quotient_dtype), scales, zeros)


def fake_quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool, clip: torch.Tensor | None = None,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    r = rtn(w, bits, group, symmetric, clip, scale_dtype)
    return dequantize_int(r.q, r.scales, r.zeros, bits, group)


def int_module(scheme: QuantScheme, r: IntQuant, bias: torch.Tensor | None = None) -> QuantizedModule:
    """Canonical tensors of lowbit/scheme.py: qweight [N, ceil(K/P)] int32, scales, zeros?, g_idx?."""
    t = {"qweight": pack_int32(r.q, scheme.bits), "scales": r.scales.float().contiguous()}
    if r.zeros is not None:
        t["zeros"] = r.zeros.to(torch.int32).contiguous()
    if r.g_idx is not None:
        t["g_idx"] = r.g_idx.to(torch.int32).contiguous()
    if bias is not None:
        t["bias"] = bias.detach().clone()
    return QuantizedModule(scheme, t)
