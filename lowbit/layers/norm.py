"""RMSNorm, optionally fused with the residual add that precedes it.

y = x / sqrt(mean(x^2) + eps) * w, computed in float32 and cast back (as transformers does).
"""

from __future__ import annotations

import torch
from torch import nn

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
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
