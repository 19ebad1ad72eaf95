"""Token sampling: repetition penalty -> temperature -> top-k -> top-p / min-p -> draw.

Rows with temperature 0 take the argmax. Draws use the exponential race argmax(p / E), E ~ Exp(1),
which equals sampling from p and lets seeded rows draw E from their own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingTensors:
    temperatures: torch.Tensor  # [B] float32; 0 = greedy
    top_ks: torch.Tensor  # [B] int64; 0 = off
    top_ps: torch.Tensor  # [B] float32; 1 = off
    min_ps: torch.Tensor  # [B] float32; 0 = off
    repetition_penalties: torch.Tensor  # [B] float32; 1 = off
    seen_tokens: torch.Tensor | None  # [B, L] int64 prompt+output ids, padded with -1; None if no penalty
    generators: list[torch.Generator | None]
    all_greedy: bool


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    # transformers' convention: positive logits of seen tokens are divided, negative ones multiplied
    bsz, vocab = logits.shape
    mask = torch.zeros(bsz, vocab + 1, dtype=torch.bool, device=logits.device)
    mask.scatter_(1, torch.where(seen < 0, vocab, seen), True)
    mask = mask[:, :vocab]
    p = penalties[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(mask, penalized, logits)


def _top_k_top_p_min_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(t.top_ks > 0, t.top_ks, vocab).clamp(max=vocab)
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # top-p: drop a token when the mass before it already reaches p (the first token always stays)
    drop |= (probs.cumsum(dim=-1) - probs) >= t.top_ps[:, None]
    drop |= probs < (t.min_ps[:, None] * probs[:, :1])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        logits = logits.float()
        if t.seen_tokens is not None:
            logits = apply_repetition_penalty(logits, t.seen_tokens, t.repetition_penalties)
        greedy = logits.argmax(dim=-1)
        if t.all_greedy:
            return greedy
        temps = torch.where(t.temperatures > 0, t.temperatures, 1.0)
        logits = _top_k_top_p_min_p(logits / temps[:, None], t)
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_()
        for i, g in enumerate(t.generators):
            if g is not None:  # seeded request: its own stream of draws
                race[i].exponential_(generator=g)
        sampled = (probs / race).argmax(dim=-1)
        return torch.where(t.temperatures > 0, sampled, greedy)
