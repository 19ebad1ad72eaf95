"""The `triton_w4a16` backend: int4/int8 weights x 16-bit activations through lowbit/kernels/w4a16.py.

prepare() repacks the layer's canonical tensors once (w4a16_layout.py) and frees them; apply() runs the
GEMM, whose launch config comes from the checked-in tables (lowbit/kernels/configs/w4a16_<gpu>.json).
Fused shards (qkv, gate_up) share one repacked weight: rows are independent, so shards are just row ranges,
as long as every shard has the same g_idx (act-order); otherwise prepare() declines.
"""

from __future__ import annotations

import torch

from lowbit.kernels.w4a16 import w4a16_gemm
from lowbit.kernels.w4a16_layout import SUPPORTED_DTYPES, w4a16_can_implement, w4a16_repack
from lowbit.layers.selection import register
from lowbit.scheme import QuantScheme


class TritonW4A16Backend:
    name = "triton_w4a16"
    families = ("w4a16", "w8a16")
    min_capability = (8, 0)
    tests = "tests/kernels/test_w4a16.py"

    def can_implement(self, scheme: QuantScheme, shape, device, dtype) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"needs a CUDA GPU, device is {device}"
        if not scheme.is_int or scheme.act_dtype != "16bit":
            return False, f"serves int4/int8 weights with 16-bit activations, not {scheme.describe()}"
        if dtype not in SUPPORTED_DTYPES:
            return False, f"activation dtype {dtype} is not supported; supported: {SUPPORTED_DTYPES}"
        return w4a16_can_implement(scheme.bits, scheme.effective_group(shape.k), shape.k, shape.n,
                                   not scheme.symmetric, scheme.act_order, dtype, device)

    def prepare(self, layer) -> None:
        scheme = layer.quant_method.scheme
        k = layer.in_features
        g_idx = None
        if layer.g_idx is not None:
            g_idx = layer.g_idx[0]
            for s in range(1, layer.g_idx.shape[0]):
                if not torch.equal(layer.g_idx[s], g_idx):
                    raise NotImplementedError(f"{self.name}: fused shards of {layer.prefix} have different g_idx "
                                              f"(shard {s} differs from shard 0); supported: one shared g_idx")
        layer.w4a16 = w4a16_repack(layer.qweight.data, layer.scales.data,
                                   layer.zeros.data if layer.zeros is not None else None, g_idx, scheme.bits,
                                   scheme.effective_group(k), k)
        for name in ("qweight", "scales", "zeros", "g_idx"):  # the repacked copy replaces them
            setattr(layer, name, None)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        smoothing = getattr(layer, "pre_quant_scale", None)
        if smoothing is not None:
            x = x * smoothing
        return w4a16_gemm(x, layer.w4a16, bias)


TRITON_W4A16 = register(TritonW4A16Backend())
