"""fp8 GEMM sweep: lowbit block-wise / per-channel / per-tensor fp8 vs cuBLAS bf16 and cuBLAS fp8 (tensor-wise).

Times come from CUDA-graph replays of several calls, each on its own copy of the weights (>= 3x L2 of
distinct bytes), so small-M numbers are HBM numbers, not L2 ones and not launch gaps; at each M the graphs of
lowbit's candidates and of the peers are replayed in turn (bench.common.Interleaved), so ratios compare the same
clocks. Columns:
  us          lowbit's GEMM alone (small_m where it quantizes in-kernel: the fused kernel from 16-bit x; else the
              GEMM the selection picks on pre-quantized x)     TFLOPs / GBps / pct_hbm / pct_fp8_peak of it
  pct_cublas  cuBLAS fp8 tensor-wise time / lowbit time (>= 0.85 is the block-wise target at M >= 2048)
  e2e_us      fp8_linear from 16-bit x (activation quantization included), vs bf16_us (cuBLAS bf16)
Also per M: each candidate forced (triton / cublas_block / small_m) for the selection table.
The passes that wrote lowbit/kernels/configs/fp8_*.json (tune, split_k_sweep, retime, split_tune, warm_bench) are
in bench/kernels/fp8_tune.py (python -m bench.kernels.fp8_tune ...).
"""

from __future__ import annotations

import math

import torch

from bench.common import copies_for as common_copies_for
from bench.common import Interleaved, graph_replay_us, print_table, rooflines, save_section

SHAPES = {  # (N, K)
    "dsv3": [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)],
    "llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "qwen3-32b": [(10240, 5120), (5120, 8192), (51200, 5120), (5120, 25600)],
}
M_ALL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
M_QUICK = [1, 16, 32, 64, 256, 2048, 8192]
QUICK_SHAPES = [(2112, 7168), (4096, 7168), (7168, 16384)]


_WARM = False  # compile-only pass (warm_bench workers): every timed callable runs once, nothing is timed


def copies_for(nbytes: int, cap: int = 16) -> int:
    return 1 if _WARM else common_copies_for(nbytes, cap)


def graph_us(fns: list, min_calls: int = 12, reps: int = 5) -> float:
    """Median per-call microseconds of the callables replayed round-robin from one CUDA graph."""
    return graph_replay_us(fns, max(1, math.ceil(min_calls / len(fns))), reps)


class _WarmOnly:
    """timer() under _WARM: each group's first callable runs once (compiling), nothing is timed."""

    def __init__(self):
        self.names = []

    def add(self, name, fns) -> None:
        safe_us(fns)
        self.names.append(name)

    def run(self) -> dict:
        return dict.fromkeys(self.names)


def timer():
    """Interleaved CUDA-graph timing with graph_us's rounds (or the compile-only stand-in under _WARM)."""
    return _WarmOnly() if _WARM else Interleaved(lambda fns: math.ceil(12 / len(fns)))


def safe_us(fns) -> float | None:
    try:
        if _WARM:
            fns[0]()
            return None
        return graph_us(fns)
    except Exception as exc:  # a candidate that cannot run this shape: recorded as missing
        print(f"    skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
        torch.cuda.synchronize()
        return None


def fp8_weight_sets(n, k, count, device="cuda"):
    """count copies of one random fp8 weight with tensor / channel / 128x128 block scales."""
    from lowbit.kernels.fp8_gemm import fp8_repack

    sets = []
    base = (torch.randn(n, k, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    for i in range(count):
        w = base if i == 0 else base.clone()
        grid = torch.rand(math.ceil(n / 128), math.ceil(k / 128), device=device) * 1e-3 + 1e-4
        sets.append({
            "w": w,
            "block": fp8_repack(w, grid, "block", [n], (128, 128)),
            "channel": fp8_repack(w, torch.rand(n, device=device) * 1e-3 + 1e-4, "channel", [n]),
            "tensor": fp8_repack(w, torch.tensor([1e-3], device=device), "tensor", [n]),
        })
    return sets


def _row(shape_name, n, k, m, us, e2e_us, bf16_us, cublas_us, cand, roof, extra):
    flops = 2.0 * m * n * k
    nbytes = n * k + m * k + 2 * m * n  # fp8 weight + fp8 x + 16-bit y, each once
    row = {"shape": shape_name, "N": n, "K": k, "M": m, "cand": cand, "us": us, "e2e_us": e2e_us,
           "bf16_us": bf16_us, "cublas_fp8_us": cublas_us}
    if us:
        row["TFLOPs"] = flops / us / 1e6
        row["GBps"] = nbytes / us / 1e3
        row["pct_hbm"] = 100 * row["GBps"] / roof["copy_GBps"]
        row["pct_fp8_peak"] = 100 * row["TFLOPs"] / roof["fp8_TFLOPs"] if roof.get("fp8_TFLOPs") else None
        row["pct_cublas"] = 100 * cublas_us / us if cublas_us else None
    if e2e_us and bf16_us:
        row["x_bf16"] = bf16_us / e2e_us  # > 1: faster than cuBLAS bf16
    row.update(extra)
    return row


def bench_shape(n, k, ms, roof, shape_name, dtype=torch.bfloat16):
    from lowbit.kernels.fp8_gemm import fp8_linear, fuses_quant, pick_candidate
    from lowbit.kernels.quant_act import quantize_fp8

    sets = fp8_weight_sets(n, k, copies_for(n * k))
    bf16 = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(2 * n * k))]
    one = torch.ones((), device="cuda")
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
        xqt, xst = quantize_fp8(x, "tensor_dynamic")
        t = timer()  # lowbit's candidates and the peers replayed in turn: the same clocks for all
        t.add("bf16_us", [lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
        t.add("cublas_us", [lambda s=s: torch._scaled_mm(xqt, s["w"].t(), one, one, out_dtype=dtype) for s in sets])
        cand = pick_candidate(sets[0]["block"], "token_group", m, dtype)
        fused = cand == "small_m" and fuses_quant(sets[0]["block"], "token_group", m)  # quantization in the GEMM
        if fused:
            t.add("us", [lambda s=s: fp8_linear(x, s["block"], "token_group") for s in sets])
        else:
            t.add("us", [lambda s=s: fp8_linear(xq, s["block"], "token_group", x_scale=xs, out_dtype=dtype,
                                                candidate=cand) for s in sets])
            t.add("e2e_us", [lambda s=s: fp8_linear(x, s["block"], "token_group") for s in sets])
        extra = {}
        for forced in (["triton"] if m > 16 else []) + (["cublas_block"] if m >= 16 else []) + (
                ["small_m"] if 16 < m <= 256 else []):
            t.add(f"{forced}_us", [lambda s=s, c=forced: fp8_linear(
                xq, s["block"], "token_group", x_scale=xs, out_dtype=dtype, candidate=c) for s in sets])
        for scheme, act in (("channel", "token"), ("tensor", "tensor_static")):
            scale = xst if act == "tensor_static" else None
            t.add(f"{scheme}_e2e_us", [lambda s=s, sc=scheme, a=act, v=scale: fp8_linear(x, s[sc], a, v) for s in sets])
            extra[f"{scheme}_cand"] = pick_candidate(sets[0][scheme], act, m, dtype)
        extra.update(t.run())
        us, bf16_us, cublas_us = extra.pop("us"), extra.pop("bf16_us"), extra.pop("cublas_us")
        e2e = us if fused else extra.pop("e2e_us")
        rows.append(_row(shape_name, n, k, m, us, e2e, bf16_us, cublas_us, cand, roof, extra))
        r = rows[-1]
        if _WARM:
            continue
        print(f"  {shape_name} M={m}: {cand} {us} us ({r.get('pct_cublas') or 0:.0f}% of cuBLAS fp8, "
              f"{r.get('pct_hbm') or 0:.0f}% HBM), e2e {e2e} us, bf16 {bf16_us} us", flush=True)
    del sets, bf16
    torch.cuda.empty_cache()
    return rows


COLUMNS = ["shape", "N", "K", "M", "cand", "us", "TFLOPs", "pct_cublas", "GBps", "pct_hbm", "e2e_us", "bf16_us",
           "x_bf16", "triton_us", "cublas_block_us", "small_m_us", "channel_e2e_us", "tensor_e2e_us"]


def main(args) -> None:
    roof = rooflines()
    print(f"rooflines: {roof}")
    ms = M_QUICK if args.quick else M_ALL
    rows = []
    for family, shapes in SHAPES.items():
        for n, k in shapes:
            if args.quick and (n, k) not in QUICK_SHAPES:
                continue
            rows += bench_shape(n, k, ms, roof, f"{family}:{n}x{k}")
    print_table(rows, COLUMNS)
    payload = {"rooflines": roof, "rows": rows, "quick": bool(args.quick),
               "timing": "CUDA graph replay, weights rotated over >= 160 MB; bf16 activations/outputs"}
    print("saved", save_section("fp8_gemm", payload, args.out))
