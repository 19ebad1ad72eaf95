"""The `triton_w4a8` backend: int4 group-128 symmetric weights x fp8 e4m3 activations on sm89+ (ModelOpt
W4A8-AWQ with static per-tensor activation scales, DeepSeek W4AFP8, dynamic token-group 128 activations).

| layer tensor (IntWeightMethod)  | what the backend keeps                                              |
|---------------------------------|---------------------------------------------------------------------|
| qweight int32 [N, ceil(K/8)]    | layer.w4a8_weights: W4A8Weights (w4a16 word tiles, kernels/w4a8.py) |
| scales [N, ceil(K/128)]         | inside W4A8Weights (group-major)                                    |
| input_scale [S] (static acts)   | layer.w4a8_input_scale [1] = max over the fused shards              |
| pre_quant_scale [K] (optional)  | used as is: x * pre_quant_scale before quantizing x (fused into the |
|                                 | decode kernel's x load or the quantization pass, rounded to the     |
|                                 | model dtype as unfused; a scale of another dtype promotes first)    |
"""

from __future__ import annotations

import torch

from lowbit.kernels import HAS_TRITON
from lowbit.layers.activation import silu_and_mul
from lowbit.layers.backends import fp8_triton
from lowbit.layers.backends.fp8_triton import DTYPES, norm_result, norm_rows, scheme_ok
from lowbit.layers.selection import register


class W4A8TritonBackend:
    name = "triton_w4a8"
    families = ("w4a8",)
    min_capability = (8, 9)
    tests = "tests/kernels/test_w4a8.py"

    def can_implement(self, scheme, shape, device, dtype):
        if not HAS_TRITON:
            return False, "triton is not installed"
        if scheme.weight_dtype != "int4":
            return False, f"weight dtype {scheme.weight_dtype} is not supported; supported: int4"
        if not scheme.symmetric:
            return False, "asymmetric int4 (zero points) is not supported; supported: symmetric (zero = 8)"
        if scheme.act_order:
            return False, "act-order (g_idx) is not supported with fp8 activations"
        if dtype not in DTYPES:
            return False, f"activation dtype {dtype} is not supported; supported: {DTYPES}"
        ok, reason = scheme_ok(scheme)
        if not ok:
            return ok, reason
        from lowbit.kernels.w4a8 import w4a8_can_implement

        return w4a8_can_implement(scheme.effective_group(shape.k), shape.n, shape.k, device)

    def prepare(self, layer) -> None:
        from lowbit.kernels.w4a8 import w4a8_repack

        scheme = layer.quant_method.scheme
        if layer.zeros is not None or layer.g_idx is not None:
            raise NotImplementedError(f"{layer.prefix}: triton_w4a8 needs symmetric int4 without g_idx")
        k = layer.in_features
        layer.w4a8_weights = w4a8_repack(layer.qweight.data, layer.scales.data, scheme.effective_group(k), k)
        layer.w4a8_input_scale = layer.input_scale.data.max().reshape(1).float() if scheme.static_input_scale else None

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from lowbit.kernels.w4a8 import w4a8_linear

        scheme = layer.quant_method.scheme
        smoothing = getattr(layer, "pre_quant_scale", None)
        # x * smoothing in the promoted dtype, as the reference backend does (w4a8_linear fuses it where it can)
        out_dtype = x.dtype if smoothing is None else torch.promote_types(x.dtype, smoothing.dtype)
        return w4a8_linear(x, layer.w4a8_weights, scheme.act_granularity, layer.w4a8_input_scale, bias=bias,
                           out_dtype=out_dtype, ue8m0=scheme.ue8m0_scales, pre_quant_scale=smoothing)

    def apply_silu_mul(self, layer, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """layer(silu(gate) * up), with SiLU-and-mul (and the layer's pre_quant_scale) inside the activation
        quantization pass (kernels/w4a8.py w4a8_linear silu_mul): gate | up [..., 2I] read once, the 16-bit product
        never written. Where the GEMM would quantize x itself (decode) or reads 16-bit x (w16), the pass writes x
        fake-quantized for lowbit's w4a16 GEMM (kernels/w4a8.py producer_candidate); otherwise below FUSE_SILU_MIN_M
        tokens the unfused product, as the fp8 backend does."""
        from lowbit.kernels.w4a8 import producer_candidate, w4a8_linear

        scheme = layer.quant_method.scheme
        smoothing = getattr(layer, "pre_quant_scale", None)
        out_dtype = gate_up.dtype if smoothing is None else torch.promote_types(gate_up.dtype, smoothing.dtype)
        m = gate_up.numel() // gate_up.shape[-1]
        out16 = out_dtype == gate_up.dtype and gate_up.dtype in (torch.float16, torch.bfloat16)
        cand = producer_candidate(layer.w4a8_weights, m, scheme.act_granularity, out16)  # passed on: no second pick
        if cand != "w16" and m < fp8_triton.FUSE_SILU_MIN_M:
            return self.apply(layer, silu_and_mul(gate_up), bias)
        return w4a8_linear(gate_up, layer.w4a8_weights, scheme.act_granularity, layer.w4a8_input_scale, bias=bias,
                           out_dtype=out_dtype, ue8m0=scheme.ue8m0_scales, pre_quant_scale=smoothing, silu_mul=True,
                           candidate=cand)

    def apply_rms_norm(self, layer, x: torch.Tensor, residual: torch.Tensor | None, norm):
        """(layer(norm(x [+ residual])), new residual) with the norm (and the layer's pre_quant_scale) fused into the
        activation quantization (kernels/norm.py): for the w16 candidate the fake-quantized operand, for the others
        the e4m3 codes and scales they read. 16-bit x at decode sizes also takes w16 (kernels/w4a8.py
        producer_candidate: the norm pays for the quantization, the GEMM is w4a16's). None (the caller normalises,
        then applies the layer) where the decode GEMM quantizes 32-bit x on its load (fused), for tensor_dynamic, a
        pre_quant_scale of another dtype, or rows the kernel does not take."""
        from lowbit.kernels import norm as knorm
        from lowbit.kernels.w4a8 import producer_candidate, w4a8_linear
        from lowbit.kernels.w4a16 import w4a16_gemm

        scheme = layer.quant_method.scheme
        gran = scheme.act_granularity
        smoothing = getattr(layer, "pre_quant_scale", None)
        rows = norm_rows(x, residual, norm, gran)
        if rows is None or (smoothing is not None and smoothing.dtype != x.dtype):
            return None
        x2, r2 = rows
        w = layer.w4a8_weights
        m = x2.shape[0]
        out16 = x.dtype in (torch.float16, torch.bfloat16)
        cand = producer_candidate(w, m, gran, out16)
        if cand == "fused":
            return None
        args = (x2, norm.weight, norm.eps, gran, layer.w4a8_input_scale, 128, scheme.ue8m0_scales)
        if cand == "w16":
            xf, _, res = knorm.rms_norm_quantize_fp8(*args, residual=r2, pre_quant_scale=smoothing, fake=True)
            y = w4a16_gemm(xf, w.w16, layer.bias)
        else:
            xq, xs, res = knorm.rms_norm_quantize_fp8(*args, column_major_scales=gran == "token_group", residual=r2,
                                                      pre_quant_scale=smoothing)
            # (cand reads e4m3 x: pick_candidate's picks are w16, fused and these)
            y = w4a8_linear(xq, w, gran, bias=layer.bias, out_dtype=x.dtype, x_scale=xs, candidate=cand)
        return norm_result(x, y, res)


TRITON_W4A8 = register(W4A8TritonBackend())
