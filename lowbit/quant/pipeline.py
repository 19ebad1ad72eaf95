"""The quantization pipeline over a transformers model (float32 on the CPU, bf16 on a GPU).

  1. calibration samples -> inputs of decoder layer 0 (hook, forward stopped there)
  2. per layer, per group of linears that share an input, in call order:
       GPTQ (true-sequential): one forward up to the group, hooking its input into H, with the
         earlier groups of the layer already quantized; then GPTQ on the group.
       AWQ / static scales: one forward collecting every group's input stats (float weights);
         AWQ searches and folds each group's smoothing; then every group is quantized.
  3. the layer's outputs, recomputed with the quantized weights, are the next layer's inputs.
Calibration-free schemes (RTN w4a16, fp8-dynamic, fp8-block) quantize every linear directly.
Out: one canonical QuantizedModule per on-disk Linear, plus every other tensor (embeddings, norms,
with AWQ's folded scales, lm_head) in the checkpoint's dtype, plus a report per linear.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.formats.base import QuantizedModule, matches_any
from lowbit.quant.capture import (InputStats, collect, decoder_layers, first_layer_inputs, linear_groups, run_layer,
                                  run_until_stop)
from lowbit.quant.layerwise import LinearReport, awq_smooth, moe_input_groups, moe_smooth, quantize_group
from lowbit.quant.moe import complete_groups, is_expert, stage_key, stages, unfuse_experts
from lowbit.quant.recipes import Recipe

# kept 16-bit unless asked otherwise: the LM head and MoE routers (embeddings and norms are not Linear)
DEFAULT_IGNORE = ("lm_head", r"re:.*mlp\.gate$", r"re:.*router$", r"re:.*shared_expert_gate$")


@dataclass
class QuantResult:
    recipe: Recipe
    modules: dict[str, QuantizedModule]
    plain: dict[str, torch.Tensor]
    ignore: list[str]  # on-disk Linear names left 16-bit
    reports: list[LinearReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # per group: AWQ smoothing, fallbacks


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    return next(n for n, m in model.named_modules() if m is layers)


def quant_targets(model: nn.Module, recipe: Recipe, ignore) -> tuple[list[str], list[str]]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if recipe.experts_only and any(is_expert(n) for n in names):
        skip = [n for n in names if not is_expert(n)]
    else:
        skip = [n for n in names if matches_any(n, ignore)]
    return [n for n in names if n not in skip], skip


@torch.no_grad()
def quantize_hf_model(model: nn.Module, recipe: Recipe, samples: torch.Tensor | None = None, *,
                      ignore=DEFAULT_IGNORE, batch_size: int = 8, scale_dtype: torch.dtype = torch.float16,
                      checkpoint_dtype: torch.dtype | None = None, progress: bool = True) -> QuantResult:
    """Quantize `model` in place (its weights become the dequantized values) and return the result."""
    model.eval()
    device = next(model.parameters()).device
    unfused = unfuse_experts(model)  # transformers' 3-D experts -> one Linear per expert (moe.py)
    targets, skipped = quant_targets(model, recipe, ignore)
    if not targets:
        raise ValueError(f"no Linear module left to quantize (ignore patterns: {list(ignore)})")
    if recipe.needs_calibration and samples is None:
        raise ValueError(f"scheme {recipe.name} needs calibration samples")
    result = QuantResult(recipe, {}, {}, skipped)
    if unfused:
        result.notes["experts"] = f"{unfused} fused MoE expert modules split into per-expert linears"
    # RTN rounds w / scale in the checkpoint's 16-bit dtype, as compressed-tensors does (rtn.py)
    qd = checkpoint_dtype if recipe.algorithm == "rtn" and checkpoint_dtype in (torch.bfloat16, torch.float16) else None
    ctx = _Ctx(recipe, scale_dtype, result, qd)
    t0 = time.perf_counter()
    if recipe.needs_calibration:
        _calibrated(model, ctx, samples, set(targets), batch_size, progress, device)
    else:
        for name in tqdm(targets, desc=f"{recipe.name}", disable=not progress, leave=False):
            mods, reps = quantize_group(recipe, [name], [model.get_submodule(name)], None, scale_dtype,
                                        quotient_dtype=qd)
            _store(result, mods, reps)
    result.seconds["quantize"] = time.perf_counter() - t0
    result.plain = _plain_tensors(model, result.modules, checkpoint_dtype)
    for m in result.modules.values():
        if "bias" in m.tensors and checkpoint_dtype is not None:
            m.tensors["bias"] = m.tensors["bias"].to(checkpoint_dtype)
    return result


@dataclass
class _Ctx:
    recipe: Recipe
    scale_dtype: torch.dtype
    result: QuantResult
    quotient_dtype: torch.dtype | None


def _calibrated(model, ctx: _Ctx, samples, targets, batch_size, progress, device):
    layers = decoder_layers(model)
    prefix = _layers_prefix(model, layers)
    t0 = time.perf_counter()
    inputs = first_layer_inputs(model, samples, batch_size, device, progress)
    ctx.result.seconds["capture"] = time.perf_counter() - t0
    for i, layer in enumerate(tqdm(layers, desc=f"{ctx.recipe.name} layers", disable=not progress)):
        lp = f"{prefix}.{i}"
        mine = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and f"{lp}.{n}" in targets]
        groups = complete_groups(linear_groups(layer, inputs[0]), mine)
        groups = [g for g in ([n for n in g if n in mine] for g in groups) if g]
        if ctx.recipe.algorithm == "gptq":
            for stage in stages(groups):  # true-sequential: each stage sees the quantized stages before it
                all_stats = _collect(layer, inputs, stage, want_h=True)
                fallback = _stage_amax(all_stats)
                for g, st in zip(stage, all_stats):
                    _finish_group(ctx, layer, lp, g, st, fallback=fallback)
        else:
            _smoothed_or_static(ctx, layer, lp, groups, inputs)
        inputs = run_layer(layer, inputs)


def _collect(layer, inputs, groups, want_h, extra=None) -> list[InputStats]:
    """One forward of the layer feeding every group's input stats (stops early when it is a single group).
    `extra`: (module name, stats) for the input of a module (the MoE block) that is no group's."""
    all_stats = [InputStats(want_hessian=want_h) for _ in groups]
    single = len(groups) == 1 and extra is None
    handles = [collect(layer.get_submodule(g[0]), st, stop=single) for g, st in zip(groups, all_stats)]
    if extra is not None:
        handles.append(collect(layer.get_submodule(extra[0]), extra[1], stop=False))
    try:
        run_until_stop(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return all_stats


def _stage_amax(all_stats: list[InputStats]) -> torch.Tensor | None:
    seen = [st.amax.max() for st in all_stats if st.amax is not None]
    return torch.stack(seen).max() if seen else None


def _smoothed_or_static(ctx: _Ctx, layer, lp, groups, inputs) -> None:
    """AWQ and static activation scales: one forward for every group's stats (float weights), AWQ's
    smoothing folded group by group (the MoE block's input-side linears jointly), then every group quantized."""
    awq_on = ctx.recipe.algorithm == "awq"
    moe = moe_input_groups(layer, groups) if awq_on else None
    block_stats = InputStats(want_hessian=True) if moe else None
    all_stats = _collect(layer, inputs, groups, awq_on, (moe[0], block_stats) if moe else None)
    originals = {}
    if awq_on:
        for g, st in zip(groups, all_stats):
            originals[g[0]] = (torch.cat([layer.get_submodule(n).weight.data.float() for n in g]),
                               st.hessian.clone() if st.hessian is not None else None)
        if moe:
            joint = [(g, st) for g, st in zip(groups, all_stats) if g in moe[1]]
            others = {g[0]: st for g, st in zip(groups, all_stats)}
            ctx.result.notes[f"{lp}.{moe[0]}"] = moe_smooth(ctx.recipe, layer, moe[0], joint, block_stats,
                                                            ctx.scale_dtype, others)
        for g, st in zip(groups, all_stats):
            if not moe or g not in moe[1]:
                ctx.result.notes[f"{lp}.{g[0]}"] = awq_smooth(ctx.recipe, layer, g, st, ctx.scale_dtype)
    by_stage = {}
    for g, st in zip(groups, all_stats):
        by_stage.setdefault(stage_key(g[0]), []).append(st)
    fallbacks = {key: _stage_amax(sts) for key, sts in by_stage.items()}
    for g, st in zip(groups, all_stats):
        w0, h0 = originals.get(g[0], (None, None))
        _finish_group(ctx, layer, lp, g, st, h0, w0, fallback=fallbacks[stage_key(g[0])])


def _finish_group(ctx: _Ctx, layer, lp, rel_names, stats, rtn_h=None, rtn_w=None, fallback=None):
    linears = [layer.get_submodule(n) for n in rel_names]
    names = [f"{lp}.{n}" for n in rel_names]
    mods, reps = quantize_group(ctx.recipe, names, linears, stats, ctx.scale_dtype, rtn_h, rtn_w,
                                quotient_dtype=ctx.quotient_dtype,
                                fallback_amax=fallback if is_expert(rel_names[0]) else None)
    _store(ctx.result, mods, reps)


def _store(result: QuantResult, mods: dict[str, QuantizedModule], reps: list[LinearReport]) -> None:
    for m in mods.values():
        m.tensors = {k: v.detach().cpu().contiguous() for k, v in m.tensors.items()}
    result.modules.update(mods)
    result.reports.extend(reps)


def _plain_tensors(model: nn.Module, modules: dict[str, QuantizedModule], dtype: torch.dtype | None):
    """Every tensor that is not part of a quantized Linear, in the checkpoint's dtype."""
    quantized = {f"{p}.{leaf}" for p in modules for leaf in ("weight", "bias")}
    tied = getattr(model.config, "tie_word_embeddings", False)
    plain = {}
    for name, t in model.state_dict().items():
        if name in quantized or (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        plain[name] = t.cpu().contiguous()
    return plain
