"""Gated activations on a fused [T, 2*I] gate/up projection (SiLU on a GPU: one Triton pass, kernels/activation.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import HAS_TRITON


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:]: one Triton pass on a GPU (kernels/activation.py), else the torch ops."""
    if HAS_TRITON and x.is_cuda:
        from lowbit.kernels import activation

        if activation.supported(x):
            return activation.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedAct(nn.Module):
    """act(x[..., :I]) * x[..., I:]"""

    def __init__(self, act: str = "silu"):
        super().__init__()
        if act not in _ACTS:
            raise NotImplementedError(f"hidden_act {act!r} is not supported; supported: {sorted(_ACTS)}")
        self.name = act  # lets a down_proj backend fuse act-and-mul into its input quantization
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


def act_linear(act: GatedAct, linear, h: torch.Tensor) -> torch.Tensor:
    """linear(act(gate) * up) from gate | up h [..., 2I] (the MLP's down projection). A backend that quantizes the
    layer's input to fp8 may take gate | up and fuse SiLU-and-mul into that quantization (`apply_silu_mul(layer, h,
    bias)`): h is read once and the 16-bit product never written."""
    fused = getattr(getattr(linear, "backend", None), "apply_silu_mul", None)
    if fused is not None and act.name == "silu":
        return fused(linear, h, linear.bias)
    return linear(act(h))
