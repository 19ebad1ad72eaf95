"""FP8 (e4m3) weight quantization for the three granularities, and static activation scales.

| granularity | weight_scale                        | activations (the scheme's)                  |
|-------------|-------------------------------------|---------------------------------------------|
| tensor      | 0-dim: amax(W) / 448                | static per tensor: amax(X) / 448 over calib |
| channel     | [N]: amax(W[n, :]) / 448            | dynamic per token                           |
| block       | [ceil(N/BN), ceil(K/BK)] per block  | dynamic per token, groups of 128 along K    |
Edge blocks are partial when BN/BK do not divide N/K (their amax covers only the real elements).
Values saturate at +-448; the cast to e4m3 rounds to nearest even.
"""

from __future__ import annotations

import math

import torch

from lowbit.formats.base import QuantizedModule
from lowbit.kernels.reference import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, dequantize_fp8
from lowbit.scheme import QuantScheme


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[N, K] -> [ceil(N/BN), ceil(K/BK)] amax; zero padding does not change an amax of |w|."""
    bn, bk = block
    n, k = w.shape
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.nn.functional.pad(w.abs(), (0, kb * bk - k, 0, nb * bn - n))
    return padded.view(nb, bn, kb, bk).amax(dim=(1, 3))


def quantize_fp8_weight(w: torch.Tensor, granularity: str, block: tuple[int, int] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (weight e4m3 [N, K], weight_scale float32 per the table above)."""
    w = w.float()
    if granularity == "tensor":
        scale = (w.abs().amax() / FP8_MAX).clamp(min=FP8_MIN_SCALE)
        return to_fp8(w / scale), scale.reshape(())
    if granularity == "channel":
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
        return to_fp8(w / scale[:, None]), scale
    if granularity == "block":
        if block is None:
            raise ValueError("block-wise fp8 weights need a block size (BN, BK)")
        scale = (_block_amax(w, block) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
        n, k = w.shape
        full = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
        return to_fp8(w / full), scale
    raise ValueError(f"fp8 weight granularity {granularity!r} is not supported; supported: tensor, channel, block")


def dequantize_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, granularity: str,
                          block: tuple[int, int] | None = None) -> torch.Tensor:
    return dequantize_fp8(weight, scale.reshape(1) if granularity == "tensor" else scale, granularity,
                          [weight.shape[0]], block)


def fake_quantize_fp8(w: torch.Tensor, granularity: str, block: tuple[int, int] | None = None) -> torch.Tensor:
    q, s = quantize_fp8_weight(w, granularity, block)
    return dequantize_fp8_weight(q, s, granularity, block)


def static_input_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """Per-tensor static activation scale from the calibration amax: amax / 448 (0-dim float32)."""
    return (torch.as_tensor(amax, dtype=torch.float32) / FP8_MAX).clamp(min=FP8_MIN_SCALE).reshape(())


def fp8_module(scheme: QuantScheme, w: torch.Tensor, bias: torch.Tensor | None = None,
               input_amax: float | torch.Tensor | None = None) -> tuple[QuantizedModule, torch.Tensor]:
    """Canonical fp8 tensors (weight, weight_scale, input_scale?) and the dequantized weight [N, K]."""
    q, s = quantize_fp8_weight(w, scheme.weight_granularity, scheme.block_size)
    t = {"weight": q, "weight_scale": s}
    if scheme.static_input_scale:
        if input_amax is None:
            raise ValueError(f"{scheme.describe()} needs calibration data for its static input scales")
        t["input_scale"] = static_input_scale(input_amax)
    if bias is not None:
        t["bias"] = bias.detach().clone()
    return QuantizedModule(scheme, t), dequantize_fp8_weight(q, s, scheme.weight_granularity, scheme.block_size)
