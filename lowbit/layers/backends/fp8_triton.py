"""The `triton_fp8` backend: w8a8 fp8 Linear layers (per-tensor, per-channel and block-wise weights) on sm89+.

Repacks once (kernels/fp8_gemm.fp8_repack) and per call quantizes x as the scheme says and runs the GEMM that
kernels/fp8_gemm.pick_candidate measured fastest for that M: lowbit's split-K Triton kernel for decode, the
Triton block GEMM, or cuBLAS (torch._scaled_mm tensor-/row-wise, F.scaled_mm block-wise 1x128 x 128x128).

| layer tensor (Fp8Method)       | what the backend keeps                                             |
|--------------------------------|--------------------------------------------------------------------|
| weight e4m3 [N, K]             | layer.fp8_weights: Fp8Weights (weight shared, scales re-laid)      |
| weight_scale (see scheme.py)   | inside Fp8Weights                                                  |
| input_scale [S] (static acts)  | layer.fp8_input_scale [1] = max over the fused shards              |
w8a16_fp8 (16-bit activations) is not served: its math keeps x unquantized, so an fp8 GEMM would change the
results; the `reference` backend (dequantize once + cuBLAS 16-bit) is the right path for it.
"""

from __future__ import annotations

import torch

from lowbit.kernels import HAS_TRITON
from lowbit.layers.activation import silu_and_mul
from lowbit.layers.selection import register
from lowbit.scheme import QuantScheme

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# SiLU-mul fused into the down_proj input quantization from this many tokens on. H100, 7168x18432 fp8 down_proj
# (python -m bench.kernels act_quant --quick, mlp_down rows): fused/unfused 0.89-1.03x at M = 1 and 16,
# 1.21-1.31x at M = 2048 and 8192
FUSE_SILU_MIN_M = 256
FAMILIES = ("w8a8_fp8", "w8a8_fp8_block")


def scheme_ok(scheme: QuantScheme) -> tuple[bool, str]:
    """Activation settings the fp8 kernels implement (shared with the w4a8 backend)."""
    if scheme.act_dtype != "fp8_e4m3":
        return False, f"activations are {scheme.act_dtype}; this backend quantizes them to fp8 e4m3"
    if scheme.act_granularity == "token_group" and scheme.act_group_size != 128:
        return False, f"activation group size {scheme.act_group_size} is not supported; supported: 128"
    if scheme.ue8m0_scales and scheme.act_granularity != "token_group":
        return False, "ue8m0 activation scales apply to token_group activations only"
    return True, ""


class Fp8TritonBackend:
    name = "triton_fp8"
    families = FAMILIES
    min_capability = (8, 9)
    tests = "tests/kernels/test_fp8_gemm.py"

    def can_implement(self, scheme, shape, device, dtype):
        if not HAS_TRITON:
            return False, "triton is not installed"
        if scheme.name not in FAMILIES:
            return False, f"scheme {scheme.name} is not supported; supported: {FAMILIES}"
        if dtype not in DTYPES:
            return False, f"activation dtype {dtype} is not supported; supported: {DTYPES}"
        ok, reason = scheme_ok(scheme)
        if not ok:
            return ok, reason
        from lowbit.kernels.fp8_gemm import fp8_can_implement

        return fp8_can_implement(scheme.weight_granularity, shape.n, shape.k, device, scheme.block_size)

    def prepare(self, layer) -> None:
        from lowbit.kernels.fp8_gemm import fp8_repack

        scheme = layer.quant_method.scheme
        layer.fp8_weights = fp8_repack(layer.weight.data, layer.weight_scale.data, scheme.weight_granularity,
                                       layer.output_sizes, scheme.block_size)
        # fused shards share one activation: the largest static scale covers every shard (scheme.py)
        layer.fp8_input_scale = layer.input_scale.data.max().reshape(1).float() if scheme.static_input_scale else None

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from lowbit.kernels.fp8_gemm import fp8_linear

        scheme = layer.quant_method.scheme
        return fp8_linear(x, layer.fp8_weights, scheme.act_granularity, layer.fp8_input_scale, bias=bias,
                          out_dtype=x.dtype, ue8m0=scheme.ue8m0_scales)


    def apply_silu_mul(self, layer, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """layer(silu(gate) * up) with the SiLU-and-mul fused into the activation quantization (one pass over
        gate|up [..., 2I] instead of writing and re-reading the 16-bit product)."""
        from lowbit.kernels.fp8_gemm import fp8_linear
        from lowbit.kernels.quant_act import silu_mul_quantize_fp8

        scheme = layer.quant_method.scheme
        lead = gate_up.shape[:-1]
        x2 = gate_up.reshape(-1, gate_up.shape[-1])
        if x2.shape[0] < FUSE_SILU_MIN_M:  # decode: one program per row makes the fused kernel slower there
            return self.apply(layer, silu_and_mul(gate_up), bias)
        xq, xs = silu_mul_quantize_fp8(x2, scheme.act_granularity, layer.fp8_input_scale, 128, scheme.ue8m0_scales,
                                       column_major_scales=True)
        y = fp8_linear(xq, layer.fp8_weights, scheme.act_granularity, layer.fp8_input_scale, bias=bias,
                       out_dtype=gate_up.dtype, x_scale=xs, ue8m0=scheme.ue8m0_scales)
        return y.reshape(*lead, y.shape[-1])

    def apply_rms_norm(self, layer, x: torch.Tensor, residual: torch.Tensor | None, norm):
        """(layer(norm(x [+ residual])), new residual) with the norm fused into the activation quantization
        (kernels/norm.py): x and the residual read once, the normalised 16-bit tensor never written. None (the caller
        normalises, then applies the layer) where the GEMM quantizes x in-kernel (decode), for tensor_dynamic
        activations, or rows the kernel does not take. (At decode, the quantization in the norm and small_m on the
        e4m3 x instead measured -4.3 to +1.6 us against the 16-bit norm and small_m's in-kernel quantization, block /
        per-tensor weights, 13 fp8 sweep shapes at M = 1 / 16, H100, ninth session: not taken.)"""
        from lowbit.kernels import norm as knorm
        from lowbit.kernels.fp8_gemm import fp8_linear, fuses_quant, pick_candidate

        scheme = layer.quant_method.scheme
        gran = scheme.act_granularity
        rows = norm_rows(x, residual, norm, gran)
        if rows is None:
            return None
        x2, r2 = rows
        m = x2.shape[0]
        cand = pick_candidate(layer.fp8_weights, gran, m, x.dtype)
        if cand == "small_m" and fuses_quant(layer.fp8_weights, gran, m):
            return None
        xq, xs, res = knorm.rms_norm_quantize_fp8(x2, norm.weight, norm.eps, gran, layer.fp8_input_scale, 128,
                                                  scheme.ue8m0_scales, column_major_scales=True, residual=r2)
        y = fp8_linear(xq, layer.fp8_weights, gran, layer.fp8_input_scale, bias=layer.bias, out_dtype=x.dtype,
                       x_scale=xs, ue8m0=scheme.ue8m0_scales, candidate=cand)
        return norm_result(x, y, res)


def norm_rows(x: torch.Tensor, residual: torch.Tensor | None, norm, gran: str):
    """(x, residual) as the [M, K] rows kernels/norm.py's quantizing form takes, or None where it does not fuse them
    (tensor_dynamic, rows it does not take): apply_rms_norm's common start (fp8 and w4a8 backends)."""
    from lowbit.kernels import norm as knorm

    x2 = x.reshape(-1, x.shape[-1])
    if gran not in knorm.FUSED_GRANULARITIES or not knorm.supported(x2, norm.weight):
        return None
    return x2, None if residual is None else residual.reshape(x2.shape)


def norm_result(x: torch.Tensor, y: torch.Tensor, res: torch.Tensor | None):
    """apply_rms_norm's return: y in x's leading shape, and the new residual (x + residual, or x itself)."""
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x if res is None else res.reshape(x.shape))


TRITON_FP8 = register(Fp8TritonBackend())
