"""Linear quant methods for every QuantScheme: canonical parameters in, one backend chosen at load.

  IntWeightMethod: int4/int8 group- or channel-wise weights (w4a16, w8a16, and w4a8 with fp8 activations)
  Fp8Method:       fp8 weights, per-tensor / per-channel / block scales (w8a8_fp8, w8a8_fp8_block, w8a16_fp8)

Parameter shapes are the canonical ones of lowbit/scheme.py. Per-shard parameters of fused layers
(g_idx, per-tensor weight scales, static input scales) have one row/element per checkpoint module.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from lowbit.layers.linear import Linear, LinearMethod
from lowbit.layers.selection import LayerShape, select_backend
from lowbit.layers.weights import WeightShapeError, copy_checked, copy_rows
from lowbit.scheme import QuantScheme


def _param(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class QuantLinearMethod(LinearMethod):
    """Shared plumbing: per-shard parameters, backend selection, apply through the backend."""

    per_shard_params: tuple[str, ...] = ()  # [S, ...] parameters, one row per fused checkpoint module
    row_params: tuple[str, ...] = ()  # [N, ...] parameters, shards are row ranges

    def __init__(self, scheme: QuantScheme, backend: str | None = None):
        self.scheme = scheme
        self.backend_override = backend
        self.name = scheme.name

    def expected_shards(self, layer: Linear, name: str) -> list[int | None]:
        return list(range(len(layer.output_sizes))) if len(layer.output_sizes) > 1 else [None]

    def _load_per_shard(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int | None) -> None:
        param = getattr(layer, name)
        row = param.data[shard or 0]
        src = tensor.reshape(row.shape) if tensor.numel() == row.numel() else tensor
        copy_checked(row, src, f"{layer.prefix}.{name}" + (f" (shard {shard})" if shard is not None else ""))

    def load_weight(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int | None) -> None:
        if name in self.per_shard_params:
            return self._load_per_shard(layer, name, tensor, shard)
        if not hasattr(layer, name) or not isinstance(getattr(layer, name), torch.Tensor):
            raise WeightShapeError(f"{layer.prefix}: {self.scheme.describe()} has no tensor {name!r}")
        super().load_weight(layer, name, tensor, shard)

    def process_after_loading(self, layer: Linear) -> None:
        shape = LayerShape(layer.out_features, layer.in_features, tuple(layer.output_sizes))
        device = next(layer.parameters()).device
        layer.backend = select_backend(self.scheme, shape, device, layer.params_dtype, self.backend_override,
                                       what=layer.prefix, prepare=lambda b: b.prepare(layer))

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.backend.apply(layer, x, bias)


class IntWeightMethod(QuantLinearMethod):
    per_shard_params = ("g_idx", "input_scale")

    def create_weights(self, layer: Linear, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        s, n, k = self.scheme, sum(output_sizes), in_features
        n_groups = math.ceil(k / s.effective_group(k))
        layer.qweight = _param((n, math.ceil(k / s.pack_factor)), torch.int32)
        layer.scales = _param((n, n_groups), torch.float32)  # float32 holds fp16/bf16/fp32 scales exactly
        layer.zeros = None if s.symmetric else _param((n, n_groups), torch.int32)
        layer.g_idx = _param((len(output_sizes), k), torch.int32) if s.act_order else None
        layer.input_scale = _param((len(output_sizes),), torch.float32) if s.static_input_scale else None
        layer.pre_quant_scale = _param((k,), dtype) if s.input_smoothing else None

    def expected_shards(self, layer, name):
        if name == "pre_quant_scale":  # one smoothing vector per input, shared by fused modules
            return [0] if len(layer.output_sizes) > 1 else [None]
        return super().expected_shards(layer, name)

    def load_weight(self, layer, name, tensor, shard):
        if name == "pre_quant_scale":
            # fused modules share an input, so their smoothing must agree (ModelOpt averages it); shards
            # arrive in file order (k_proj before q_proj), so the first one loaded sets it
            if getattr(layer, "pre_quant_scale_loaded", False):
                mine = layer.pre_quant_scale.data
                if not torch.equal(mine, tensor.to(device=mine.device, dtype=mine.dtype)):
                    raise WeightShapeError(f"{layer.prefix}: fused modules carry different pre_quant_scale")
                return
            copy_checked(layer.pre_quant_scale, tensor, f"{layer.prefix}.pre_quant_scale")
            layer.pre_quant_scale_loaded = True
            return
        super().load_weight(layer, name, tensor, shard)


class Fp8Method(QuantLinearMethod):
    per_shard_params = ("input_scale",)

    def create_weights(self, layer: Linear, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        s, n, k = self.scheme, sum(output_sizes), in_features
        layer.weight = _param((n, k), torch.float8_e4m3fn)
        if s.weight_granularity == "tensor":
            layer.weight_scale = _param((len(output_sizes),), torch.float32)
        elif s.weight_granularity == "channel":
            layer.weight_scale = _param((n,), torch.float32)
        else:
            bn, bk = s.block_size
            layer.weight_scale = _param((sum(math.ceil(x / bn) for x in output_sizes), math.ceil(k / bk)), torch.float32)
        layer.input_scale = _param((len(output_sizes),), torch.float32) if s.static_input_scale else None

    def load_weight(self, layer, name, tensor, shard):
        g = self.scheme.weight_granularity
        if name == "weight_scale" and g == "tensor":
            return self._load_per_shard(layer, name, tensor, shard)
        if name == "weight_scale" and g == "channel":
            tensor = tensor.reshape(-1)  # producers write [N], [N, 1]
        if name == "weight_scale" and g == "block" and shard is not None:
            bn = self.scheme.block_size[0]
            start = sum(math.ceil(x / bn) for x in layer.output_sizes[:shard])
            rows = math.ceil(layer.output_sizes[shard] / bn)
            return copy_rows(layer.weight_scale, tensor, start, rows, f"{layer.prefix}.weight_scale (shard {shard})")
        super().load_weight(layer, name, tensor, shard)


def method_for_scheme(scheme: QuantScheme | None, backend: str | None = None) -> LinearMethod:
    from lowbit.layers.linear import UnquantizedLinearMethod

    if scheme is None:
        return UnquantizedLinearMethod()
    if scheme.is_int:
        return IntWeightMethod(scheme, backend)
    return Fp8Method(scheme, backend)
