"""RMSNorm, optionally fused with the residual add that precedes it, and `norm_linear`: the norm and the linear
layer after it, with the norm fused into the layer's activation quantization where its backend offers that.

y = x / sqrt(mean(x^2) + eps) * w, computed in float32 and cast back (as transformers does). On a GPU the add and
the norm run as one Triton kernel (kernels/norm.py; a value may differ from this torch path by one ulp); on the CPU,
or for rows wider than kernels.norm.MAX_K, in torch.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels import HAS_TRITON
from lowbit.layers.weights import copy_checked


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def load_weight(self, name: str, tensor: torch.Tensor, shard=None) -> None:
        copy_checked(getattr(self, name), tensor, name)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: returns norm(x). With it: x += residual, returns (norm(x), x)."""
        if HAS_TRITON and x.is_cuda:
            from lowbit.kernels import norm as knorm

            x2 = x.reshape(-1, x.shape[-1])
            if knorm.supported(x2, self.weight) and (residual is None or residual.dtype == x.dtype):
                if residual is None:
                    return knorm.rms_norm(x2, self.weight, self.eps).reshape(x.shape)
                y, r = knorm.rms_norm(x2, self.weight, self.eps, residual.reshape(x2.shape))
                return y.reshape(x.shape), r.reshape(x.shape)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def norm_linear(norm: RMSNorm, linear, x: torch.Tensor, residual: torch.Tensor | None = None):
    """(linear(norm(x [+ residual])), the new residual: x + residual, or x itself without one). A backend that
    quantizes the layer's input to fp8 may fuse the norm into that quantization (`apply_rms_norm(layer, x, residual,
    norm)`, returning the same pair, or None where it does not fuse at this size): the normalised 16-bit activations
    are then never written."""
    fused = getattr(getattr(linear, "backend", None), "apply_rms_norm", None)
    if fused is not None:
        out = fused(linear, x, residual, norm)
        if out is not None:
            return out
    if residual is None:
        return linear(norm(x)), x
    h, residual = norm(x, residual)
    return linear(h), residual
