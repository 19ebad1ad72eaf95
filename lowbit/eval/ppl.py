"""Perplexity with a sliding window, through lowbit's own model (what lowbit serves).

The first window is tokens [0, context_len) and scores all but its first token; each next window
ends `stride` tokens later (at most context_len - 1, so windows overlap) and scores only its new
tokens, so every token after the first is predicted exactly once, with at least
context_len - stride tokens of left context (except near the start):
  ppl = exp( sum of -log p(token | context) / number of scored tokens )
A logits function maps token ids [T] to logits [T, V]; `lowbit_logits_fn` runs a lowbit model as
one prefill without a KV cache, `hf_logits_fn` a transformers model (the reference in tests).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from lowbit.layers.attention import AttentionMetadata


@dataclass
class PplResult:
    tokens: int  # scored tokens
    nll: float  # mean negative log-likelihood (nats per token)
    ppl: float
    seconds: float
    context_len: int
    stride: int

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "nll": round(self.nll, 6), "ppl": round(self.ppl, 4),
                "seconds": round(self.seconds, 2), "context_len": self.context_len, "stride": self.stride}


def prefill_metadata(t: int, device) -> AttentionMetadata:
    """One sequence of t new tokens and no cache (kv_caches=None): a plain causal prefill."""
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([t], dtype=torch.int32, device=device),
        slot_mapping=torch.empty(0, dtype=torch.long, device=device),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),
        query_lens_cpu=[t], seq_lens_cpu=[t], kv_caches=None,
        token_seq_lens=torch.full((t,), t, dtype=torch.int32, device=device),
    )


def lowbit_logits_fn(model, device) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.inference_mode()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        t = ids.shape[0]
        hidden = model(ids, torch.arange(t, device=device), prefill_metadata(t, device))
        return model.compute_logits(hidden).float()

    return logits


def hf_logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    device = next(model.parameters()).device

    @torch.inference_mode()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids[None].to(device), use_cache=False).logits[0].float()

    return logits


def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, context_len: int = 512,
               stride: int | None = None, progress: bool = False) -> PplResult:
    """ids [L] -> PplResult over tokens 1..L-1."""
    stride = stride or context_len // 2
    if context_len < 2 or not 0 < stride <= context_len:
        raise ValueError(f"need context_len >= 2 and 0 < stride <= context_len, got {context_len}, {stride}")
    ids = ids.reshape(-1).long()
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} tokens; perplexity needs at least 2")
    t0 = time.perf_counter()
    n = ids.numel()
    step = min(stride, context_len - 1)  # a window cannot predict its own first token: keep >= 1 of overlap
    windows = 1 + math.ceil(max(0, n - context_len) / step)
    total, count, scored_to = 0.0, 0, 1  # tokens [1, scored_to) are scored
    for w in tqdm(range(windows), desc="perplexity", disable=not progress, leave=False):
        end = min(context_len, n) if w == 0 else min(n, scored_to + step)
        begin = max(0, end - context_len)
        window = ids[begin:end]
        logp = torch.log_softmax(logits_fn(window)[:-1].cpu().float(), dim=-1)  # row i predicts window[i + 1]
        targets = ids[scored_to:end]
        nll = -logp[scored_to - begin - 1:].gather(1, targets[:, None]).squeeze(1)
        total += float(nll.double().sum())
        count += targets.numel()
        scored_to = end
    mean = total / count
    return PplResult(count, mean, math.exp(mean), time.perf_counter() - t0, context_len, stride)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The text as one id stream, the tokenizer's BOS first when it adds one."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)
