"""MoE experts at quantization time: unfuse transformers' 3-D expert tensors into one nn.Linear per expert.

transformers >= 5 keeps the routed experts of Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 as two parameters of one
module, `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I], called as
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. Checkpoints (and every format lowbit
writes) store them per expert, `mlp.experts.{e}.{gate,up,down}_proj`. `unfuse_experts` swaps each such module
for `UnfusedExperts`, which computes the same thing (transformers' eager loop) with per-expert Linears, so the
layer-by-layer pipeline sees each expert as ordinary linears whose inputs are exactly the tokens routed to
it: GPTQ accumulates each expert's H from its own tokens, an expert reached by too few falls back to RTN
(reported with its token count), and the saved names are the on-disk ones.

Staging (pipeline.py): the experts of a layer run in parallel, so their linears are collected together, one
forward for every expert's gate/up and one for every down_proj (true-sequential between the two), instead
of one forward per expert.
"""

from __future__ import annotations

import re

import torch
from torch import nn

EXPERT = re.compile(r"(^|\.)experts\.(\d+)\.")
# linears that read the expert's input (gate/up; w1/w3 in Mixtral/ModelOpt naming) and the one that reads its hidden
EXPERT_IN = ("gate_proj", "up_proj", "w1", "w3")


class ExpertMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    return lin


class UnfusedExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts module: same call, one ExpertMLP per expert."""

    def __init__(self, fused: nn.Module):
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        inter = gate_up.shape[1] // 2
        super().__init__(ExpertMLP(gate_up[e, :inter], gate_up[e, inter:], down[e]) for e in range(gate_up.shape[0]))
        self.act_fn = fused.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
            and not getattr(module, "has_bias", False) and hasattr(module, "act_fn"))


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` in place; returns how many were replaced."""
    fused = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, m in fused:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, UnfusedExperts(m))
    return len(fused)


def stage_key(rel_name: str) -> str:
    """A linear's stage: its name with the expert index folded (every expert's gate/up are one stage)."""
    return EXPERT.sub(r"\1experts.*.", rel_name)


def complete_groups(groups: list[list[str]], names: list[str]) -> list[list[str]]:
    """Add the linears a one-sample forward did not reach (experts no token of that sample was routed to):
    an expert's gate/up as one group, its down_proj as another."""
    seen = {n for g in groups for n in g}
    extra: dict[tuple[str, bool], list[str]] = {}
    for n in names:
        if n not in seen:
            prefix, _, leaf = n.rpartition(".")
            extra.setdefault((prefix, leaf in EXPERT_IN), []).append(n)
    return groups + list(extra.values())


def stages(groups: list[list[str]]) -> list[list[list[str]]]:
    """Groups batched by stage_key of their first linear, in order of each key's first appearance."""
    out: dict[str, list[list[str]]] = {}
    for g in groups:
        out.setdefault(stage_key(g[0]), []).append(g)
    return list(out.values())


def is_expert(name: str) -> bool:
    return EXPERT.search(name) is not None
