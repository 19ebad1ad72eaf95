"""`lowbit.quant.quantize(...)`: the Python API behind `lowbit quantize`.

    from lowbit.quant import quantize
    summary = quantize("HuggingFaceTB/SmolLM2-135M-Instruct", "w4a16-gptq", "out/", group_size=64)
MODEL is a local directory, a hub id, or None for the embedded SmolLM2-135M-Instruct (its bf16 weights).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from lowbit.quant.calibration import calibration_samples, load_texts
from lowbit.quant.pipeline import DEFAULT_IGNORE, QuantResult, quant_targets, quantize_hf_model
from lowbit.quant.recipes import Recipe, check_format, check_shapes, fit_group, make_recipe
from lowbit.quant.report import build_report, print_summary

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Calibration:
    source: str | None = None  # file, folder, JSONL, dataset name; None = the default license texts
    num_samples: int = 32
    seq_len: int = 256
    seed: int = 0


def checkpoint_dtype(model_dir: str) -> torch.dtype:
    from lowbit.quant.save import source_config

    cfg = source_config(model_dir)
    return _DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16", torch.bfloat16)


def load_calibration_model(model_dir: str, device: torch.device):
    """transformers' model as the calibration-time model: float32 on the CPU, bf16 on a GPU."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def run_quantization(model_dir: str, recipe: Recipe, calib: Calibration, *, fmt: str = "compressed-tensors",
                     ignore=DEFAULT_IGNORE, device: str | None = None, batch_size: int = 8,
                     progress: bool = True, auto_group: bool = False) -> tuple[QuantResult, float]:
    """Quantize without writing: the result (canonical tensors, reports) and the seconds it took.
    `auto_group`: the group size was not given, so a default that does not divide some K may shrink."""
    from transformers import AutoTokenizer

    from lowbit.engine.llm import pick_device

    t0 = time.perf_counter()
    dev = pick_device(device)
    model = load_calibration_model(model_dir, dev)
    targets, _ = quant_targets(model, recipe, ignore)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in targets}
    if auto_group:
        fitted = fit_group(recipe, shapes)
        if fitted is not recipe:
            print(f"lowbit: group size {recipe.scheme.group_size} does not divide every in-features K; "
                  f"using {fitted.scheme.group_size}", flush=True)
        recipe = fitted
    check_shapes(recipe, fmt, shapes)
    samples = None
    if recipe.needs_calibration:
        tok = AutoTokenizer.from_pretrained(model_dir)
        samples = calibration_samples(tok, load_texts(calib.source), calib.num_samples, calib.seq_len, calib.seed)
    ckpt = checkpoint_dtype(model_dir)
    result = quantize_hf_model(model, recipe, samples, ignore=ignore, batch_size=batch_size,
                               scale_dtype=recipe.scale_dtype(fmt, ckpt), checkpoint_dtype=ckpt, progress=progress)
    return result, time.perf_counter() - t0


def quantize(model: str | None, scheme: str, out: str, *, calib: str | None = None, num_samples: int = 32,
             seq_len: int = 256, seed: int = 0, group_size: int | None = None, symmetric: bool | None = None,
             act_order: str = "static", ignore=(), fmt: str = "compressed-tensors", device: str | None = None,
             batch_size: int = 8, progress: bool = True, verbose: bool = True) -> dict:
    """Quantize MODEL with SCHEME, write it to OUT in FMT; returns the report (also saved beside it).
    `symmetric` None: the format's convention (awq: zero points; everything else: symmetric)."""
    from lowbit.hub import default_model_dir, resolve_model
    from lowbit.quant.save import save_result, weights_size

    if symmetric is None:
        symmetric = fmt != "awq" or scheme.startswith("w4a8")
    recipe = make_recipe(scheme, group_size, symmetric, act_order)
    check_format(recipe, fmt)
    if os.path.isdir(out) and any(f.endswith(".safetensors") for f in os.listdir(out)):
        raise ValueError(f"--out {out} already holds *.safetensors weights; choose a new or empty directory")
    model_dir = default_model_dir() if model is None else resolve_model(model)  # None: the bf16 SmolLM2
    if os.path.abspath(out) == os.path.abspath(model_dir):
        raise ValueError(f"--out {out} is the source model directory; choose another")
    result, seconds = run_quantization(model_dir, recipe, Calibration(calib, num_samples, seq_len, seed), fmt=fmt,
                                       ignore=tuple(DEFAULT_IGNORE) + tuple(ignore), device=device,
                                       batch_size=batch_size, progress=progress, auto_group=group_size is None)
    t0 = time.perf_counter()
    save_result(result, model_dir, out, fmt, progress=progress)
    result.seconds["save"] = time.perf_counter() - t0
    result.seconds["total"] = seconds + result.seconds["save"]
    report = build_report(result, model_dir, out, fmt, weights_size(model_dir), weights_size(out))
    save_result_report(out, report)
    if verbose:
        print_summary(report)
    return report


def save_result_report(out: str, report: dict) -> None:
    import json

    with open(os.path.join(out, "quantization_report.json"), "w") as f:
        json.dump(report, f, indent=1)
