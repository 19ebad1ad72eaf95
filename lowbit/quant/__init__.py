"""Offline quantization: RTN, GPTQ, AWQ, W4A8-AWQ and FP8 over a transformers model (`lowbit quantize`)."""

from lowbit.quant.api import quantize
from lowbit.quant.recipes import FORMATS, SCHEMES, make_recipe

__all__ = ["quantize", "make_recipe", "SCHEMES", "FORMATS"]
