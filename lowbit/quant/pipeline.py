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
from lowbit.quant.layerwise import LinearReport, awq_smooth, quantize_group
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


def fused_experts(model: nn.Module) -> list[str]:
    """MoE experts stored as one [E, ...] parameter (transformers 5's Qwen/DeepSeek MoE): not nn.Linear."""
    return [n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in f".{n}"]


def _is_expert(name: str) -> bool:
    return ".experts." in name


def quant_targets(model: nn.Module, recipe: Recipe, ignore) -> tuple[list[str], list[str]]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if recipe.experts_only and any(_is_expert(n) for n in names):
        skip = [n for n in names if not _is_expert(n)]
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
    fused = fused_experts(model)
    if fused and recipe.experts_only:
        raise NotImplementedError(f"{recipe.name} quantizes MoE experts, but this model keeps them as fused 3-D "
                                  f"parameters ({fused[0]}, ...; transformers >= 5), which lowbit cannot quantize yet")
    targets, skipped = quant_targets(model, recipe, ignore)
    if not targets:
        raise ValueError(f"no Linear module left to quantize (ignore patterns: {list(ignore)})")
    if recipe.needs_calibration and samples is None:
        raise ValueError(f"scheme {recipe.name} needs calibration samples")
    result = QuantResult(recipe, {}, {}, skipped)
    if fused:
        result.notes["experts"] = f"{len(fused)} fused 3-D expert tensors left 16-bit (not supported yet)"
    t0 = time.perf_counter()
    if recipe.needs_calibration:
        _calibrated(model, recipe, samples, set(targets), batch_size, scale_dtype, result, progress, device)
    else:
        for name in tqdm(targets, desc=f"{recipe.name}", disable=not progress, leave=False):
            mods, reps = quantize_group(recipe, [name], [model.get_submodule(name)], None, scale_dtype)
            _store(result, mods, reps)
    result.seconds["quantize"] = time.perf_counter() - t0
    result.plain = _plain_tensors(model, result.modules, checkpoint_dtype)
    for m in result.modules.values():
        if "bias" in m.tensors and checkpoint_dtype is not None:
            m.tensors["bias"] = m.tensors["bias"].to(checkpoint_dtype)
    return result


def _calibrated(model, recipe, samples, targets, batch_size, scale_dtype, result, progress, device):
    layers = decoder_layers(model)
    prefix = _layers_prefix(model, layers)
    t0 = time.perf_counter()
    inputs = first_layer_inputs(model, samples, batch_size, device, progress)
    result.seconds["capture"] = time.perf_counter() - t0
    for i, layer in enumerate(tqdm(layers, desc=f"{recipe.name} layers", disable=not progress)):
        lp = f"{prefix}.{i}"
        groups = [[n for n in g if f"{lp}.{n}" in targets] for g in linear_groups(layer, inputs[0])]
        groups = [g for g in groups if g]
        if recipe.algorithm == "gptq":
            for g in groups:  # true-sequential: each group sees the quantized groups before it
                stats = InputStats(want_hessian=True)
                handle = collect(layer.get_submodule(g[0]), stats, stop=True)
                try:
                    run_until_stop(layer, inputs)
                finally:
                    handle.remove()
                _finish_group(recipe, layer, lp, g, stats, scale_dtype, result)
        else:
            want_h = recipe.algorithm == "awq"
            all_stats = [InputStats(want_hessian=want_h) for _ in groups]
            handles = [collect(layer.get_submodule(g[0]), st, stop=False) for g, st in zip(groups, all_stats)]
            try:
                run_until_stop(layer, inputs)
            finally:
                for h in handles:
                    h.remove()
            originals = {}
            if recipe.algorithm == "awq":
                for g, st in zip(groups, all_stats):
                    originals[g[0]] = (torch.cat([layer.get_submodule(n).weight.data.float() for n in g]),
                                       st.hessian.clone())
                for g, st in zip(groups, all_stats):
                    result.notes[f"{lp}.{g[0]}"] = awq_smooth(recipe, layer, g, st, scale_dtype)
            for g, st in zip(groups, all_stats):
                w0, h0 = originals.get(g[0], (None, None))
                _finish_group(recipe, layer, lp, g, st, scale_dtype, result, h0, w0)
        inputs = run_layer(layer, inputs)


def _finish_group(recipe, layer, lp, rel_names, stats, scale_dtype, result, rtn_h=None, rtn_w=None):
    linears = [layer.get_submodule(n) for n in rel_names]
    names = [f"{lp}.{n}" for n in rel_names]
    mods, reps = quantize_group(recipe, names, linears, stats, scale_dtype, rtn_h, rtn_w)
    _store(result, mods, reps)


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
