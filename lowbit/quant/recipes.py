"""What each `--scheme` of `lowbit quantize` means: algorithm, QuantScheme, calibration, formats.

| scheme      | algorithm     | weights                      | activations                   | calibration |
|-------------|---------------|------------------------------|-------------------------------|-------------|
| w4a16-rtn   | round-nearest | int4, group G (128)          | 16-bit                        | no          |
| w4a16-gptq  | GPTQ          | int4, group G (128)          | 16-bit                        | yes         |
| w4a16-awq   | AWQ + clip    | int4, group G (128)          | 16-bit                        | yes         |
| w8a16-gptq  | GPTQ          | int8, per channel (or G)     | 16-bit                        | yes         |
| w4a8-awq    | AWQ + clip    | int4 sym, group 128          | fp8, static per tensor        | yes         |
| w4a8-rtn    | round-nearest | int4 sym, group 128; only the MoE experts when the model has them | fp8 static | yes |
| fp8         | cast          | fp8, per tensor              | fp8, static per tensor        | yes         |
| fp8-dynamic | cast          | fp8, per channel             | fp8, dynamic per token        | no          |
| fp8-block   | cast          | fp8, blocks 128x128          | fp8, per token, groups of 128 | no          |
Static activation scales are amax / 448 over the calibration tokens, one per input (shared by the
linears that read it).
Formats (`--format`): compressed-tensors stores every scheme; gptq the int ones; awq int4 with zero
points; fp8-block DeepSeek-V3's block fp8; modelopt ModelOpt's W4A8_AWQ (K % 128 == 0, even N).
Every int format stores whole groups, so G must divide each K: a default G (not given by the user)
shrinks to 64 or 32 when 128 does not (SmolLM2: K = 576 -> 64); fp8 blocks may be partial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lowbit.scheme import QuantScheme

# format name -> (writer module, schemes it can store)
FORMATS = {
    "compressed-tensors": ("lowbit.formats.compressed_tensors",
                           ("w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a16-gptq", "w4a8-awq", "w4a8-rtn",
                            "fp8", "fp8-dynamic", "fp8-block")),
    "gptq": ("lowbit.formats.gptq", ("w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a16-gptq")),
    "awq": ("lowbit.formats.awq", ("w4a16-rtn", "w4a16-gptq", "w4a16-awq")),
    "fp8-block": ("lowbit.formats.fp8", ("fp8-block",)),  # DeepSeek-V3 style: block weights only
    "modelopt": ("lowbit.formats.modelopt_w4a8", ("w4a8-awq", "w4a8-rtn")),  # ModelOpt W4A8_AWQ
}
ALGORITHMS = ("rtn", "gptq", "awq", "fp8")


@dataclass(frozen=True)
class Recipe:
    name: str
    algorithm: str  # one of ALGORITHMS
    scheme: QuantScheme
    needs_calibration: bool
    act_order: str = "off"  # GPTQ: off | static | dynamic
    experts_only: bool = False  # quantize only MoE experts when the model has them

    def scale_dtype(self, fmt: str, model_dtype: torch.dtype) -> torch.dtype:
        """Integer scales are rounded to what the format stores before the weights are rounded."""
        if not self.scheme.is_int:
            return torch.float32
        if fmt == "compressed-tensors" and model_dtype in (torch.bfloat16, torch.float16):
            return model_dtype
        return torch.float16


def _int_scheme(bits: int, group: int | None, symmetric: bool, act_order: bool = False,
                fp8_act: bool = False) -> QuantScheme:
    dtype = f"int{bits}"
    act = dict(act_dtype="fp8_e4m3", act_granularity="tensor_static") if fp8_act else {}
    if group is None or group <= 0:
        return QuantScheme(dtype, "channel", symmetric=symmetric, act_order=act_order, **act)
    return QuantScheme(dtype, "group", group_size=group, symmetric=symmetric, act_order=act_order, **act)


SCHEMES = ("w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a16-gptq", "w4a8-awq", "w4a8-rtn",
           "fp8", "fp8-dynamic", "fp8-block")


def make_recipe(name: str, group_size: int | None = None, symmetric: bool = True, act_order: str = "static") -> Recipe:
    """`group_size`: None = the scheme's default (128; per channel for w8a16), 0 or -1 = per channel."""
    if name not in SCHEMES:
        raise ValueError(f"scheme {name!r} is not supported; supported: {', '.join(SCHEMES)}")
    if name.startswith("w4a8") and (not symmetric or group_size not in (None, 128)):
        raise ValueError(f"{name} is int4 symmetric with group 128 (what W4A8 kernels and ModelOpt expect); "
                         f"got group {group_size}, {'symmetric' if symmetric else 'asymmetric'}")
    g = 128 if group_size is None else group_size
    if name == "w4a16-rtn":
        return Recipe(name, "rtn", _int_scheme(4, g, symmetric), False)
    if name == "w4a16-gptq":
        return Recipe(name, "gptq", _int_scheme(4, g, symmetric, act_order == "dynamic"), True, act_order)
    if name == "w4a16-awq":
        return Recipe(name, "awq", _int_scheme(4, g, symmetric), True)
    if name == "w8a16-gptq":
        g8 = None if group_size is None else group_size
        return Recipe(name, "gptq", _int_scheme(8, g8, symmetric, act_order == "dynamic"), True, act_order)
    if name == "w4a8-awq":
        return Recipe(name, "awq", _int_scheme(4, 128, True, fp8_act=True), True)
    if name == "w4a8-rtn":
        return Recipe(name, "rtn", _int_scheme(4, 128, True, fp8_act=True), True, experts_only=True)
    if name == "fp8":
        return Recipe(name, "fp8", QuantScheme("fp8_e4m3", "tensor", act_dtype="fp8_e4m3",
                                               act_granularity="tensor_static"), True)
    if name == "fp8-dynamic":
        return Recipe(name, "fp8", QuantScheme("fp8_e4m3", "channel", act_dtype="fp8_e4m3", act_granularity="token"),
                      False)
    return Recipe(name, "fp8", QuantScheme("fp8_e4m3", "block", block_size=(128, 128), act_dtype="fp8_e4m3",
                                           act_granularity="token_group", act_group_size=128), False)


def check_format(recipe: Recipe, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    allowed = FORMATS[fmt][1]
    if recipe.name not in allowed:
        raise ValueError(f"format {fmt!r} cannot store scheme {recipe.name!r}; it stores: {', '.join(allowed)}")
    if fmt == "awq" and (recipe.scheme.bits != 4 or recipe.scheme.weight_granularity != "group"):
        raise ValueError("the awq format stores int4 group-wise weights only")
    if fmt == "awq" and recipe.scheme.symmetric:
        raise ValueError("the awq format stores zero points (asymmetric int4); drop --sym or pass --asym")
    if fmt == "awq" and recipe.scheme.act_order:
        raise ValueError("the awq format has no g_idx; use --act-order static or off")
    return fmt


def fit_group(recipe: Recipe, shapes: dict[str, tuple[int, int]]) -> Recipe:
    """The default group (128) made to fit: the largest of 128, 64, 32 dividing every K (SmolLM2: K = 576 -> 64)."""
    s = recipe.scheme
    if not s.is_int or s.weight_granularity != "group" or recipe.name.startswith("w4a8"):
        return recipe
    if all(k % s.group_size == 0 for _, k in shapes.values()):
        return recipe
    for g in (128, 64, 32):
        if g < s.group_size and all(k % g == 0 for _, k in shapes.values()):
            return dataclasses.replace(recipe, scheme=dataclasses.replace(s, group_size=g))
    return recipe


def check_shapes(recipe: Recipe, fmt: str, shapes: dict[str, tuple[int, int]]) -> None:
    """Before any calibration: every int format on disk (compressed-tensors, GPTQ, AWQ, ModelOpt) stores whole
    groups only, so G must divide each quantized linear's K. (fp8 blocks may be partial.)"""
    s = recipe.scheme
    if not s.is_int or s.weight_granularity != "group":
        return
    bad = {n: k for n, (_, k) in shapes.items() if k % s.group_size}
    if bad:
        ks = sorted(set(bad.values()))
        fits = [g for g in (128, 64, 32) if all(k % g == 0 for _, k in shapes.values())]
        hint = f"--group-size {fits[0]}" if fits and not recipe.name.startswith("w4a8") else "--ignore them"
        raise ValueError(f"group size {s.group_size} does not divide in-features K={ks} of {len(bad)} linears "
                         f"(e.g. {next(iter(bad))}); format {fmt!r} stores whole groups only; use {hint}")
