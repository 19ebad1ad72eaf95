"""Quantize the linears of one group (linears that share an input) and of one decoder layer.

A group's rows are quantized together when they share H (GPTQ on q/k/v at once is the same as one
by one: rows are independent given H); the results are split back into one QuantizedModule per
on-disk Linear. Each linear's weight is then replaced by its dequantized value, so what runs after
it (the rest of the layer, the next layers) sees the quantized model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.formats.base import QuantizedModule
from lowbit.quant import awq, fp8
from lowbit.quant.capture import InputStats
from lowbit.quant.gptq import gptq_quantize, relative_error
from lowbit.quant.recipes import Recipe
from lowbit.quant.rtn import IntQuant, dequantize_int, fake_quantize, int_module, rtn

# AWQ: the op whose output is a group's input, by the group's first linear (relative to the layer)
SMOOTH_SOURCES = {
    "self_attn.q_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "self_attn.o_proj": "self_attn.v_proj",  # foldable only when v_proj.out == o_proj.in (no GQA)
    "mlp.down_proj": "mlp.up_proj",
}
NO_CLIP = ("q_proj", "k_proj")
# MoE: the input-side linears of routed experts and shared experts; 16-bit modules reading the same input
MOE_INPUT = re.compile(r"^(.*mlp)\.(experts\.\d+|shared_experts?)\.(gate_proj|up_proj|w1|w3)$")
MOE_PASSENGERS = ("gate", "shared_expert_gate")
# fewer calibration tokens than this reached a linear (a rarely routed MoE expert): no usable H, RTN instead
MIN_TOKENS = 16


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]  # (N, K)
    error: float | None  # ||W X - Q X||^2 / ||W X||^2 on the calibration inputs
    rtn_error: float | None = None  # the same for round-to-nearest on the same inputs
    note: str = ""
    tokens: int | None = None  # calibration tokens that reached it (MoE experts: the tokens routed to them)


def _split_rows(r: IntQuant, sizes: list[int]) -> list[IntQuant]:
    out, row = [], 0
    for n in sizes:
        z = r.zeros[row:row + n] if r.zeros is not None else None
        out.append(IntQuant(r.q[row:row + n], r.scales[row:row + n], z, r.g_idx))
        row += n
    return out


def quantize_group(recipe: Recipe, names: list[str], linears: list[nn.Linear], stats: InputStats | None,
                   scale_dtype: torch.dtype, rtn_h: torch.Tensor | None = None, rtn_w: torch.Tensor | None = None,
                   quotient_dtype: torch.dtype | None = None, fallback_amax: torch.Tensor | None = None
                   ) -> tuple[dict[str, QuantizedModule], list[LinearReport]]:
    """Quantize linears that read the same input; `rtn_w`/`rtn_h`: the pre-smoothing weight and H for the
    RTN comparison (AWQ), else the current ones. `quotient_dtype`: the RTN algorithm rounds w / scale in it
    (rtn.py). `fallback_amax`: the static activation amax for a group no calibration token reached (an
    unrouted MoE expert: the largest amax of its sibling experts)."""
    s = recipe.scheme
    sizes = [m.out_features for m in linears]
    w = torch.cat([m.weight.data.float() for m in linears])  # [sum N, K]
    h = stats.hessian if stats is not None and stats.count >= MIN_TOKENS else None
    modules, reports, dq = {}, [], None
    amax = stats.amax.max() if stats is not None and stats.amax is not None else None
    count = stats.count if stats is not None else 0
    amax_note = ""
    if amax is None and fallback_amax is not None and s.static_input_scale:
        amax, amax_note = fallback_amax, "input scale of its sibling experts (no calibration token)"
    if s.is_int:
        k = w.shape[1]
        group = s.effective_group(k)
        note = ""
        if recipe.algorithm in ("gptq", "awq") and h is None:
            note = f"RTN fallback: {stats.count if stats is not None else 0} calibration tokens (< {MIN_TOKENS})"
        if recipe.algorithm == "gptq" and h is not None:
            res = gptq_quantize(w, h, s.bits, group, s.symmetric, recipe.act_order, scale_dtype=scale_dtype)
            quant, dq = res.quant, res.dequant
            note = f"damp {res.damp:g}" if res.damp != 0.01 else ""
        else:
            clip = None
            if recipe.algorithm == "awq" and h is not None and not any(n.endswith(NO_CLIP) for n in names):
                clip = awq.search_clip(w, h, s.bits, group, s.symmetric, scale_dtype=scale_dtype)
            qd = quotient_dtype if recipe.algorithm == "rtn" else None
            quant = rtn(w, s.bits, group, s.symmetric, clip, scale_dtype, qd)
            dq = dequantize_int(quant.q, quant.scales, quant.zeros, s.bits, group)
        parts = _split_rows(quant, sizes)
        for name, m, part in zip(names, linears, parts):
            mod = int_module(s, part, m.bias)
            if s.static_input_scale:
                mod.tensors["input_scale"] = fp8.static_input_scale(amax)
            modules[name] = mod
    else:
        rows = []
        for name, m in zip(names, linears):
            modules[name], wq = fp8.fp8_module(s, m.weight.data, m.bias, amax)
            rows.append(wq)
        dq = torch.cat(rows)
    row = 0
    for name, m, n in zip(names, linears, sizes):
        wq = dq[row:row + n]
        err = rerr = None
        if h is not None:
            err = relative_error(w[row:row + n], wq, h)
            if s.is_int and recipe.algorithm != "rtn":
                w0 = (rtn_w if rtn_w is not None else w)[row:row + n]
                h0 = rtn_h if rtn_h is not None else h
                rerr = relative_error(w0, fake_quantize(w0, s.bits, s.effective_group(w.shape[1]), s.symmetric,
                                                        scale_dtype=scale_dtype), h0)
        text = "; ".join(t for t in ((note if s.is_int else ""), amax_note) if t)
        reports.append(LinearReport(name, (n, w.shape[1]), err, rerr, text, count if stats is not None else None))
        m.weight.data = wq.to(m.weight.dtype)
        row += n
    return modules, reports


def awq_smooth(recipe: Recipe, layer: nn.Module, rel_names: list[str], stats: InputStats,
               scale_dtype: torch.dtype) -> str:
    """Search the group's smoothing scale, fold it into its producer; returns a note for the report."""
    source_name = smooth_source(rel_names[0])
    linears = [layer.get_submodule(n) for n in rel_names]
    k = linears[0].in_features
    source = _get(layer, source_name)
    if source is None:
        return "no smoothing (producer unknown)"
    if isinstance(source, nn.Linear):
        if source.out_features != k:
            return f"no smoothing ({source_name} out {source.out_features} != in {k})"
    elif getattr(source, "weight", None) is None or source.weight.shape != (k,):
        return f"no smoothing ({source_name} has no [K] weight)"
    if stats.count < MIN_TOKENS:
        return f"no smoothing ({stats.count} calibration tokens)"
    s = recipe.scheme
    w = torch.cat([m.weight.data.float() for m in linears])
    scale, best, base = awq.search_scale(w, stats.hessian, stats.abs_mean, s.bits, s.effective_group(k),
                                         s.symmetric, scale_dtype=scale_dtype)
    if isinstance(source, nn.Linear):
        awq.fold_into_rows(source, scale)
    else:
        awq.fold_into_norm(source, scale)
    for m in linears:
        awq.scale_columns(m, scale)
    stats.rescale(scale)
    return f"smoothing into {source_name}: loss x{best / max(base, 1e-30):.3f}"


def smooth_source(rel_name: str) -> str | None:
    """The producer of a group's input: SMOOTH_SOURCES, or X.up_proj for any X.down_proj (MoE experts)."""
    if rel_name in SMOOTH_SOURCES:
        return SMOOTH_SOURCES[rel_name]
    if rel_name.endswith(".down_proj"):
        return rel_name[: -len("down_proj")] + "up_proj"
    return None


def moe_input_groups(layer: nn.Module, groups: list[list[str]]) -> tuple[str, list[list[str]]] | None:
    """(MoE block name, the groups that read its input: every routed expert's gate/up and the shared
    experts' gate/up), or None for a dense layer."""
    found = [(m.group(1), g) for g in groups if (m := MOE_INPUT.match(g[0]))]
    if not found:
        return None
    block = found[0][0]
    return block, [g for b, g in found if b == block]


def moe_smooth(recipe: Recipe, layer: nn.Module, block: str, joint: list[tuple[list[str], InputStats]],
               block_stats: InputStats, scale_dtype: torch.dtype, others: dict[str, InputStats]) -> str:
    """AWQ for a MoE block: one smoothing scale for all linears that read its input (every expert's gate/up,
    the shared experts'), searched on the block's whole input (all tokens; each expert sees a routed subset),
    folded into post_attention_layernorm. The router and the shared-expert gate read the same input and stay
    16-bit: their columns take the scale too, so routing is unchanged. `others`: every group's stats by its first
    linear (a router that is quantized after all gets its stats rescaled)."""
    source = _get(layer, "post_attention_layernorm")
    if source is None or getattr(source, "weight", None) is None:
        return "no smoothing (post_attention_layernorm not found)"
    if block_stats.count < MIN_TOKENS:
        return f"no smoothing ({block_stats.count} calibration tokens)"
    s = recipe.scheme
    linears = [layer.get_submodule(n) for g, _ in joint for n in g]
    k = linears[0].in_features
    w = torch.cat([m.weight.data.float() for m in linears])
    scale, best, base = awq.search_scale(w, block_stats.hessian, block_stats.abs_mean, s.bits, s.effective_group(k),
                                         s.symmetric, scale_dtype=scale_dtype)
    awq.fold_into_norm(source, scale)
    for m in linears:
        awq.scale_columns(m, scale)
    for name in MOE_PASSENGERS:
        p = _get(layer, f"{block}.{name}")
        if p is not None and getattr(p, "weight", None) is not None and p.weight.shape[-1] == k:
            awq.scale_columns(p, scale)
            if f"{block}.{name}" in others:  # a router the user chose to quantize: its input is x / s now
                joint = joint + [([f"{block}.{name}"], others[f"{block}.{name}"])]
    for _, st in joint:
        if st.amax is not None:
            st.rescale(scale)
    return f"smoothing {len(joint)} expert input groups into post_attention_layernorm: loss x{best / max(base, 1e-30):.3f}"


def _get(layer: nn.Module, name: str | None) -> nn.Module | None:
    if name is None:
        return None
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None
