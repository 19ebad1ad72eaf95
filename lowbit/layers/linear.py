"""Linear layers with a pluggable quant method.

A `Linear` owns its parameters through a `LinearMethod`, one per quantization scheme:
  create_weights(layer, ...)   canonical parameters (the layouts documented in lowbit/formats)
  load_weight(layer, ...)      one checkpoint tensor (already canonical) into a parameter / shard
  process_after_loading(layer) repack ONCE for the kernel the backend selection picked
  apply(layer, x, bias)        y = x @ W^T (+ bias)

Fused projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj) are one Linear with several output
shards; every canonical tensor keeps the output dim N first, so a shard is a row range.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.layers.weights import copy_checked, copy_rows


class LinearMethod:
    """Base quant method. Subclasses register parameters on the layer in `create_weights`."""

    name = "base"

    def create_weights(self, layer: "Linear", in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        raise NotImplementedError

    def load_weight(self, layer: "Linear", name: str, tensor: torch.Tensor, shard: int | None) -> None:
        """Default: parameters are [N, ...]; a shard is a row range of N."""
        param = getattr(layer, name)
        what = f"{layer.prefix}.{name}"
        if shard is None:
            copy_checked(param, tensor, what)
        else:
            copy_rows(param, tensor, layer.shard_offsets[shard], layer.output_sizes[shard], what)

    def process_after_loading(self, layer: "Linear") -> None:
        pass

    def apply(self, layer: "Linear", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    name = "unquantized"

    def create_weights(self, layer, in_features, output_sizes, dtype):
        layer.weight = nn.Parameter(torch.empty(sum(output_sizes), in_features, dtype=dtype), requires_grad=False)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


class Linear(nn.Module):
    """y = x W^T + b with W split into named output shards (`shard_names`), e.g. ("q", "k", "v")."""

    def __init__(
        self,
        in_features: int,
        output_sizes: int | Sequence[int],
        *,
        bias: bool = False,
        quant_method: LinearMethod | None = None,
        dtype: torch.dtype | None = None,
        prefix: str = "",
    ):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.shard_offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.prefix = prefix
        self.params_dtype = dtype
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, self.output_sizes, dtype)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False) if bias else None

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        if name == "bias":
            if self.bias is None:
                raise ValueError(f"{self.prefix}.bias: checkpoint has a bias but this layer has none")
            if shard is None:
                copy_checked(self.bias, tensor, f"{self.prefix}.bias")
            else:
                copy_rows(self.bias, tensor, self.shard_offsets[shard], self.output_sizes[shard], f"{self.prefix}.bias")
            return
        self.quant_method.load_weight(self, name, tensor, shard)

    def expected_shards(self, name: str) -> list[int | None]:
        """Which checkpoint shards must fill parameter `name`: one per fused module, or the whole."""
        if name != "bias" and hasattr(self.quant_method, "expected_shards"):
            return self.quant_method.expected_shards(self, name)
        return list(range(len(self.output_sizes))) if len(self.output_sizes) > 1 else [None]

    def process_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, method={self.quant_method.name}"
