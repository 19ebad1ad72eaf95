"""The `reference` backend: dequantize once at load, then torch matmul; activations are quantized
and dequantized exactly as the scheme says. Serves every scheme on every device (the CPU path and
the oracle the kernels are checked against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels import reference as ref
from lowbit.layers.selection import register
from lowbit.scheme import QuantScheme


def dequantized_weight(layer, scheme: QuantScheme) -> torch.Tensor:
    """The layer's full-precision weight [N, K] (float32) from its canonical tensors."""
    k = layer.in_features
    if scheme.is_int:
        g = scheme.effective_group(k)
        parts, row = [], 0
        for s, n in enumerate(layer.output_sizes):  # act-order: each fused shard has its own g_idx
            g_idx = layer.g_idx[s] if layer.g_idx is not None else None
            zeros = layer.zeros[row:row + n] if layer.zeros is not None else None
            parts.append(ref.dequantize_int(layer.qweight[row:row + n], layer.scales[row:row + n], zeros, g_idx,
                                            scheme.bits, g, k))
            row += n
        return torch.cat(parts)
    return ref.dequantize_fp8(layer.weight, layer.weight_scale, scheme.weight_granularity, layer.output_sizes,
                              scheme.block_size)


def fake_quantize_input(layer, scheme: QuantScheme, x: torch.Tensor) -> torch.Tensor:
    """x as the fp8 GEMM sees it: quantized per the scheme, then dequantized (static scales: max over shards)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    scale = layer.input_scale.max() if scheme.static_input_scale else None
    xq, s = ref.quantize_fp8_ref(x2, scheme.act_granularity, scale, scheme.act_group_size or 128, scheme.ue8m0_scales)
    return ref.dequantize_fp8_act(xq, s, scheme.act_granularity, scheme.act_group_size or 128).to(x.dtype).reshape(shape)


class ReferenceBackend:
    name = "reference"
    families = ("w4a16", "w8a16", "w4a8", "w8a8", "w8a8_fp8", "w8a8_fp8_block", "w8a16_fp8")  # every QuantScheme.name
    min_capability = None
    tests = "tests/layers/test_reference_schemes.py"

    def can_implement(self, scheme, shape, device, dtype):
        return True, ""

    def prepare(self, layer) -> None:
        layer.ref_weight = dequantized_weight(layer, layer.quant_method.scheme).to(layer.params_dtype)

    def apply(self, layer, x, bias):
        scheme = layer.quant_method.scheme
        smoothing = getattr(layer, "pre_quant_scale", None)
        if smoothing is not None:
            x = x * smoothing
        if scheme.act_dtype == "fp8_e4m3":
            x = fake_quantize_input(layer, scheme, x)
        return F.linear(x, layer.ref_weight, bias)


REFERENCE = register(ReferenceBackend())
