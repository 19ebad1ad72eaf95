"""Token embedding and the LM head (a Linear, so it can be quantized; or tied to the embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.layers.weights import copy_checked


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, dtype=dtype), requires_grad=False)

    def load_weight(self, name: str, tensor: torch.Tensor, shard=None) -> None:
        copy_checked(getattr(self, name), tensor, f"embedding.{name}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
