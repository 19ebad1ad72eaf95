"""Activation quantization sweep: quantize_fp8 (4 granularities) and silu_mul_quantize_fp8 vs copy bandwidth.

Bytes = 16-bit input read + e4m3 output written + scales (tensor_dynamic reads the input twice: amax pass,
then quantize; counted once, so its fraction shows the cost of the second pass). pct_copy is the fraction
of the device-to-device copy bandwidth (read + write) measured in the same run; the target is >= 70% at
8192 x 7168. Peer: the eager torch reference (reference.quantize_fp8_ref; F.silu * up first for SiLU).
`silu_mul` rows: SiLU-and-mul alone (kernels/activation.py, what GatedAct runs on a GPU) against the torch ops.
`norm` / `norm_quant` rows: add + RMSNorm (+ quantize) in one pass (kernels/norm.py) against the unfused sequences
(bench_norm); `norm_linear_*` rows: a norm and the gate_up_proj after it, layers/norm.norm_linear against the torch
norm module then the layer (bench_norm_linear). `mlp_down` rows time a whole fp8 down_proj with the SiLU-mul fused into its input quantization against the
unfused sequence (torch SiLU-mul, then the GEMM that quantizes its input); `mlp_down_w4a8` rows the same for w4a8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import print_table, rooflines, save_section
from bench.kernels.fp8 import copies_for, safe_us, timer

GRANS = ["tensor_static", "tensor_dynamic", "token", "token_group"]
M_ALL = [1, 16, 128, 1024, 4096, 8192]
CASES = [("quant", 7168), ("quant", 2048), ("quant", 16384), ("silu", 18432), ("silu", 2048)]  # (op, K or I)


def bench_case(op, k, m, gran, roof, dtype=torch.bfloat16):
    from lowbit.kernels.quant_act import quantize_fp8, silu_mul_quantize_fp8
    from lowbit.kernels.reference import quantize_fp8_ref

    width = 2 * k if op == "silu" else k
    xs = [torch.randn(m, width, device="cuda", dtype=dtype) for _ in range(copies_for(2 * m * width, cap=8))]
    scale = torch.tensor([0.05], device="cuda") if gran == "tensor_static" else None
    if op == "silu":
        us = safe_us([lambda x=x: silu_mul_quantize_fp8(x, gran, scale) for x in xs])
        ref = safe_us([lambda x=x: quantize_fp8_ref(F.silu(x[:, :k]) * x[:, k:], gran, scale) for x in xs[:2]])
    else:
        us = safe_us([lambda x=x: quantize_fp8(x, gran, scale) for x in xs])
        ref = safe_us([lambda x=x: quantize_fp8_ref(x, gran, scale) for x in xs[:2]])
    n_scales = {"token": m, "token_group": m * (k // 128)}.get(gran, 1)
    nbytes = 2 * m * width + m * k + 4 * n_scales
    r = {"op": op, "M": m, "K": k, "gran": gran, "us": us, "torch_ref_us": ref}
    if us:
        r["GBps"] = nbytes / us / 1e3
        r["pct_copy"] = 100 * r["GBps"] / roof["copy_GBps"]
        r["x_torch"] = ref / us if ref else None
    return r


def _pair(fused_fns, unfused_fns) -> tuple:
    """(fused us, unfused us), their CUDA graphs replayed in turn (bench.common.Interleaved): the same clocks."""
    t = timer()
    t.add("fused", fused_fns)
    t.add("unfused", unfused_fns)
    r = t.run()
    return r["fused"], r["unfused"]


def bench_mlp_down(m, gran, n=7168, inter=18432, dtype=torch.bfloat16):
    """down_proj(silu(gate) * up) with fp8 weights (DeepSeek-V3 dense MLP): SiLU-mul fused into the activation
    quantization (what the triton_fp8 backend runs) against torch's SiLU-mul followed by the quantizing GEMM."""
    from lowbit.kernels.fp8_gemm import fp8_linear, fp8_repack
    from lowbit.kernels.quant_act import silu_mul_quantize_fp8

    block = (128, 128) if gran == "token_group" else None
    w = (torch.randn(n, inter, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    ws = torch.full(((n + 127) // 128, (inter + 127) // 128), 0.01, device="cuda") if block else \
        torch.full((n,), 0.01, device="cuda")
    wts = fp8_repack(w, ws, "block" if block else "channel", [n], block)
    hs = [torch.randn(m, 2 * inter, device="cuda", dtype=dtype) for _ in range(copies_for(4 * m * inter, cap=4))]

    def fused(h):
        xq, xs = silu_mul_quantize_fp8(h, gran, None, 128, column_major_scales=True)
        return fp8_linear(xq, wts, gran, bias=None, out_dtype=dtype, x_scale=xs)

    def unfused(h):
        return fp8_linear(F.silu(h[:, :inter]) * h[:, inter:], wts, gran, out_dtype=dtype)

    us, ref = _pair([lambda h=h: fused(h) for h in hs], [lambda h=h: unfused(h) for h in hs])
    return {"op": "mlp_down", "M": m, "K": inter, "gran": gran, "us": us, "torch_ref_us": ref,
            "x_torch": ref / us if us and ref else None}


def bench_mlp_down_w4a8(m, gran, n=7168, inter=18432, dtype=torch.bfloat16):
    """The same down_proj with int4 group-128 weights and fp8 activations (w4a8: tensor_static is W4A8-AWQ's
    per-tensor input scale): w4a8_linear with silu_mul (what the triton_w4a8 backend runs from FUSE_SILU_MIN_M
    tokens on) against torch's SiLU-mul followed by w4a8_linear. Below that M w4a8_linear forms the product first
    where its GEMM quantizes in-kernel, so the two columns time the same work there."""
    from lowbit.kernels.reference import pack_int32
    from lowbit.kernels.w4a8 import w4a8_linear, w4a8_repack

    q = pack_int32(torch.randint(0, 16, (n, inter), device="cuda", dtype=torch.int32), 4)
    wts = w4a8_repack(q, torch.rand(n, inter // 128, device="cuda") * 1e-2 + 1e-3, 128, inter)
    scale = torch.tensor([0.02], device="cuda") if gran == "tensor_static" else None
    hs = [torch.randn(m, 2 * inter, device="cuda", dtype=dtype) for _ in range(copies_for(4 * m * inter, cap=4))]
    us, ref = _pair([lambda h=h: w4a8_linear(h, wts, gran, scale, silu_mul=True) for h in hs],
                    [lambda h=h: w4a8_linear(F.silu(h[:, :inter]) * h[:, inter:], wts, gran, scale) for h in hs])
    return {"op": "mlp_down_w4a8", "M": m, "K": inter, "gran": gran, "us": us, "torch_ref_us": ref,
            "x_torch": ref / us if us and ref else None}


def bench_norm(m, k, gran, roof, dtype=torch.bfloat16):
    """Add + RMSNorm + quantize (the input of qkv_proj / gate_up_proj): one fused pass (kernels/norm.py
    rms_norm_quantize_fp8, what the fp8 / w4a8 backends run) against lowbit's norm kernel followed by quantize_fp8,
    and against the torch module's math followed by quantize_fp8 (what ran before), interleaved. gran None: the
    16-bit norm alone (rms_norm against the torch math). pct_copy counts the bytes the fused pass must move: x and
    the residual read, the new residual and the output (e4m3, or 16-bit for gran None) written."""
    from lowbit.kernels.norm import rms_norm, rms_norm_quantize_fp8
    from lowbit.kernels.quant_act import quantize_fp8

    n = copies_for(6 * m * k, cap=4)
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(n)]
    rs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(n)]
    w = torch.rand(k, device="cuda", dtype=dtype) + 0.5
    scale = torch.tensor([0.05], device="cuda") if gran == "tensor_static" else None

    def torch_norm(x, r):  # layers/norm.py's torch path
        x = x + r
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype), x

    t = timer()
    pairs = list(zip(xs, rs))
    if gran is None:
        t.add("us", [lambda x=x, r=r: rms_norm(x, w, 1e-6, residual=r) for x, r in pairs])
        t.add("torch_ref_us", [lambda x=x, r=r: torch_norm(x, r) for x, r in pairs])
    else:
        t.add("us", [lambda x=x, r=r: rms_norm_quantize_fp8(x, w, 1e-6, gran, scale, residual=r,
                                                            column_major_scales=True) for x, r in pairs])
        t.add("unfused_us", [lambda x=x, r=r: quantize_fp8(rms_norm(x, w, 1e-6, residual=r)[0], gran, scale,
                                                           column_major_scales=True) for x, r in pairs])
        t.add("torch_ref_us", [lambda x=x, r=r: quantize_fp8(torch_norm(x, r)[0], gran, scale,
                                                             column_major_scales=True) for x, r in pairs])
    res = t.run()
    row = {"op": "norm" if gran is None else "norm_quant", "M": m, "K": k, "gran": gran or "-", **res}
    if res["us"]:
        nbytes = m * k * (2 + 2 + 2 + (2 if gran is None else 1))
        row["GBps"] = nbytes / res["us"] / 1e3
        row["pct_copy"] = 100 * row["GBps"] / roof["copy_GBps"]
        row["x_torch"] = res["torch_ref_us"] / res["us"] if res["torch_ref_us"] else None
        if res.get("unfused_us"):
            row["x_unfused"] = res["unfused_us"] / res["us"]
    return row


def bench_silu_mul(m, i=18432, dtype=torch.bfloat16, roof=None):
    """SiLU-and-mul alone (GatedAct on a GPU: kernels/activation.py silu_mul) against the torch ops it replaced."""
    from lowbit.kernels.activation import silu_mul

    xs = [torch.randn(m, 2 * i, device="cuda", dtype=dtype) for _ in range(copies_for(6 * m * i, cap=4))]
    t = timer()
    t.add("us", [lambda x=x: silu_mul(x) for x in xs])
    t.add("torch_ref_us", [lambda x=x: F.silu(x[:, :i]) * x[:, i:] for x in xs])
    res = t.run()
    row = {"op": "silu_mul", "M": m, "K": i, "gran": "-", **res}
    if res["us"]:
        row["GBps"] = 6 * m * i / res["us"] / 1e3
        row["pct_copy"] = 100 * row["GBps"] / roof["copy_GBps"] if roof else None
        row["x_torch"] = res["torch_ref_us"] / res["us"] if res["torch_ref_us"] else None
    return row


def _layer(kind, k, n, dtype):
    """A Linear [K -> N] with random weights of `kind` (fp8_block: DeepSeek-style fp8 128x128 blocks, token_group
    acts; w4a8: int4 group 128, static per-tensor acts; w4a8_tg: the same, token_group 128 acts; w4a16: int4 group
    128 symmetric, 16-bit acts; bf16: unquantized), repacked for its GPU backend."""
    import dataclasses

    from lowbit.kernels.reference import pack_int32
    from lowbit.layers.linear import Linear
    from lowbit.layers.quant_methods import method_for_scheme
    from lowbit.scheme import FP8_BLOCK, W4A8_TENSOR_STATIC, W4A16_G128

    scheme = {"fp8_block": FP8_BLOCK, "w4a8": W4A8_TENSOR_STATIC, "w4a8_tg": dataclasses.replace(
        W4A8_TENSOR_STATIC, act_granularity="token_group", act_group_size=128), "w4a16": W4A16_G128,
        "bf16": None}[kind]
    layer = Linear(k, [n], quant_method=method_for_scheme(scheme) if scheme else None, dtype=dtype,
                   prefix="bench").cuda()
    if kind == "fp8_block":
        layer.weight.data.copy_((torch.randn(n, k, device="cuda") * 0.5).to(torch.float8_e4m3fn))
        layer.weight_scale.data.fill_(0.01)
    elif kind.startswith("w4"):
        layer.qweight.data.copy_(pack_int32(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32), 4))
        # 16-bit scales, as checkpoints carry them (the repack then keeps them 16-bit; fp32 ones load slower)
        layer.scales.data.copy_((torch.rand(n, k // 128, device="cuda") * 1e-2 + 1e-3).to(dtype))
        if layer.input_scale is not None:
            layer.input_scale.data.fill_(0.05)
    else:
        layer.weight.data.normal_(0, 0.02)
    layer.process_after_loading()
    return layer


def bench_norm_linear(m, kind, k=4096, n=28672, dtype=torch.bfloat16):
    """A decoder layer's post-attention norm and gate_up_proj (Llama-3-70B: 8192 -> 2 x 28672 by default):
    norm_linear (the norm fused into the projection's input quantization where the backend offers it, else the
    Triton norm, then the layer) against what ran before (the torch RMSNorm module, then the layer), interleaved."""
    from lowbit.layers.norm import RMSNorm, norm_linear

    layer = _layer(kind, k, n, dtype)
    norm = RMSNorm(k, 1e-6, dtype=dtype).cuda()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    r = torch.randn(m, k, device="cuda", dtype=dtype)

    def before():
        xs = x + r
        xf = xs.float()
        return layer(norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)), xs

    t = timer()
    t.add("us", [lambda: norm_linear(norm, layer, x, r)])
    t.add("torch_ref_us", [before])
    res = t.run()
    backend = getattr(layer, "backend", None)  # (unquantized layers have none: F.linear)
    fused = getattr(backend, "apply_rms_norm", None)
    return {"op": f"norm_linear_{kind}", "M": m, "K": k, "gran": backend.name if backend else "torch",
            "fused": bool(fused and fused(layer, x, r, norm) is not None), **res,
            "x_torch": res["torch_ref_us"] / res["us"] if res["us"] and res["torch_ref_us"] else None}


def main(args) -> None:
    roof = rooflines()
    print(f"rooflines: {roof}")
    rows = []
    ms = [int(v) for v in args.ms.split(",")] if getattr(args, "ms", None) else None  # --ms 8192: the case
    for op, k in CASES[:2] + CASES[3:4] if args.quick else CASES:
        for m in ms or ([1, 8192] if args.quick else M_ALL):
            for gran in GRANS:
                rows.append(bench_case(op, k, m, gran, roof))
                r = rows[-1]
                print(f"  {op} M={m} K={k} {gran}: {r['us']} us, {r.get('pct_copy') or 0:.0f}% of copy", flush=True)
    for m in [v for v in [1, 16, 2048, 8192] if not ms or v in ms]:
        # torch_ref_us here: unfused SiLU-mul, then the same GEMM quantizing its input
        for gran in ("token", "token_group"):
            rows.append(bench_mlp_down(m, gran))
            print(f"  mlp_down M={m} {gran}: fused {rows[-1]['us']} us, unfused {rows[-1]['torch_ref_us']} us", flush=True)
        for gran in ("tensor_static", "token_group"):
            rows.append(bench_mlp_down_w4a8(m, gran))
            print(f"  mlp_down_w4a8 M={m} {gran}: fused {rows[-1]['us']} us, unfused {rows[-1]['torch_ref_us']} us",
                  flush=True)
    for m in [v for v in [1, 16, 2048, 8192] if not ms or v in ms]:
        rows.append(bench_silu_mul(m, roof=roof))
        print(f"  silu_mul M={m}: {rows[-1]['us']} us, torch {rows[-1]['torch_ref_us']} us", flush=True)
    for k in (7168, 4096):
        for m in [v for v in [1, 16, 2048, 8192] if not ms or v in ms]:
            for gran in (None, "tensor_static", "token", "token_group"):
                rows.append(bench_norm(m, k, gran, roof))
                r = rows[-1]
                print(f"  {r['op']} M={m} K={k} {r['gran']}: {r['us']} us ({r.get('pct_copy') or 0:.0f}% of copy), "
                      f"unfused {r.get('unfused_us')}, torch {r['torch_ref_us']}", flush=True)
    for kind in ("bf16", "fp8_block", "w4a8", "w4a8_tg"):
        for m in [v for v in [16, 256, 2048, 8192] if not ms or v in ms]:
            rows.append(bench_norm_linear(m, kind, k=8192, n=57344))
            r = rows[-1]
            print(f"  {r['op']} M={m} ({r['gran']}, fused {r['fused']}): {r['us']} us, before {r['torch_ref_us']} us",
                  flush=True)
    print_table(rows, ["op", "M", "K", "gran", "us", "GBps", "pct_copy", "torch_ref_us", "x_torch", "unfused_us",
                       "x_unfused"])
    payload = {"rooflines": roof, "rows": rows, "quick": bool(args.quick), "ms": ms, "dtype": "bfloat16",
               "timing": "CUDA graph replay over rotated inputs"}
    print("saved", save_section("act_quant", payload, args.out))
