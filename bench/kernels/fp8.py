"""fp8 GEMM sweep: lowbit block-wise / per-channel / per-tensor fp8 vs cuBLAS bf16 and cuBLAS fp8 (tensor-wise).

Times come from CUDA-graph replays of several calls, each on its own copy of the weights (>= 3x L2 of
distinct bytes), so small-M numbers are HBM numbers, not L2 ones and not launch gaps. Columns:
  us          lowbit's GEMM alone (M <= 16: the fused quantize + split-K kernel from 16-bit x; else the GEMM
              the selection picks on pre-quantized x)          TFLOPs / GBps / pct_hbm / pct_fp8_peak of it
  pct_cublas  cuBLAS fp8 tensor-wise time / lowbit time (>= 0.85 is the block-wise target at M >= 2048)
  e2e_us      fp8_linear from 16-bit x (activation quantization included), vs bf16_us (cuBLAS bf16)
Also per M: each candidate forced (triton / cublas_block / small_m) for the selection table.
`tune(out)` sweeps kernel configs (used once to write lowbit/kernels/configs/fp8_*.json).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from bench.common import print_table, rooflines, save_section

SHAPES = {  # (N, K)
    "dsv3": [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)],
    "llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "qwen3-32b": [(10240, 5120), (5120, 8192), (51200, 5120), (5120, 25600)],
}
M_ALL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
M_QUICK = [1, 16, 32, 64, 256, 2048, 8192]
QUICK_SHAPES = [(2112, 7168), (4096, 7168), (7168, 16384)]
ROTATE_BYTES = 160 * 2**20  # distinct bytes per graph: > 3x the 50 MB L2 of an H100


def copies_for(nbytes: int, cap: int = 16) -> int:
    return max(1, min(cap, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def graph_us(fns: list, min_calls: int = 12, reps: int = 5) -> float:
    """Median per-call microseconds of the callables replayed round-robin from one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    rounds = max(1, math.ceil(min_calls / len(fns)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (rounds * len(fns)))
    del graph
    return sorted(times)[len(times) // 2]


def safe_us(fns) -> float | None:
    try:
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
    from lowbit.kernels.fp8_gemm import fp8_linear, pick_candidate
    from lowbit.kernels.quant_act import quantize_fp8

    sets = fp8_weight_sets(n, k, copies_for(n * k))
    bf16 = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(2 * n * k))]
    one = torch.ones((), device="cuda")
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
        xqt, xst = quantize_fp8(x, "tensor_dynamic")
        bf16_us = safe_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
        cublas_us = safe_us([lambda s=s: torch._scaled_mm(xqt, s["w"].t(), one, one, out_dtype=dtype) for s in sets])
        cand = pick_candidate(sets[0]["block"], "token_group", m, dtype)
        if cand == "small_m":  # the fused kernel: quantization is inside the GEMM
            us = safe_us([lambda s=s: fp8_linear(x, s["block"], "token_group") for s in sets])
            e2e = us
        else:
            us = safe_us([lambda s=s: fp8_linear(xq, s["block"], "token_group", x_scale=xs, out_dtype=dtype,
                                                 candidate=cand) for s in sets])
            e2e = safe_us([lambda s=s: fp8_linear(x, s["block"], "token_group") for s in sets])
        extra = {}
        for forced in (["triton"] if m > 16 else []) + (["cublas_block"] if m >= 16 else []) + (
                ["small_m"] if 16 < m <= 64 else []):
            extra[f"{forced}_us"] = safe_us([lambda s=s, c=forced: fp8_linear(
                xq, s["block"], "token_group", x_scale=xs, out_dtype=dtype, candidate=c) for s in sets])
        for scheme, act in (("channel", "token"), ("tensor", "tensor_static")):
            scale = xst if act == "tensor_static" else None
            extra[f"{scheme}_e2e_us"] = safe_us([lambda s=s: fp8_linear(x, s[scheme], act, scale) for s in sets])
            extra[f"{scheme}_cand"] = pick_candidate(sets[0][scheme], act, m, dtype)
        rows.append(_row(shape_name, n, k, m, us, e2e, bf16_us, cublas_us, cand, roof, extra))
        r = rows[-1]
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


# ---- config tuning (run once per GPU; results become lowbit/kernels/configs/*.json) -----------------


def _tune_small_m(out, int4: bool, shapes, ms=(1, 16), warm=False):
    from lowbit.kernels import fp8_small_m
    from lowbit.kernels.w4a8 import w4a8_repack

    best = {}
    for n, k in shapes:
        if int4:
            from lowbit.kernels.reference import pack_int32

            ws = [w4a8_repack(pack_int32(torch.randint(0, 16, (n, k), device="cuda"), 4),
                              torch.rand(n, math.ceil(k / 128), device="cuda") * 1e-2, 128, k)
                  for _ in range(copies_for(n * k // 2))]
            args = [(w.qweight, w.scales, w.rows, w.counters) for w in ws]
        else:
            sets = fp8_weight_sets(n, k, copies_for(n * k))
            args = [(s["w"], s["block"].grid, s["block"].grid_rows, s["block"].counters) for s in sets]
        from lowbit.kernels.quant_act import quantize_fp8

        sms = torch.cuda.get_device_properties(0).multi_processor_count
        kb = math.ceil(k / 128)
        results = []
        for block_n in (128, 256):
            s0 = max(1, min(16, kb // 2, round(3 * sms / math.ceil(n / block_n))))  # ~3 programs per SM
            for splits in sorted({max(1, s0 // 2), s0, min(16, kb, 2 * s0)}):
                if warm and splits > 2:
                    continue
                for warps, stages in ((4, 3), (8, 3), (8, 4)):
                    cfg = (block_n, splits, warps, stages)
                    t = []
                    for m in ms:
                        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                        call = [lambda a=a: fp8_small_m.fp8_small_m(
                            x, None, fp8_small_m.A_DYN_GROUP, a[0], a[1], a[2], a[3], n, k, w_int4=int4,
                            config=cfg) for a in args]
                        if warm:  # compile only (fills the on-disk Triton cache for the timed pass)
                            call[0]()
                            if not int4:
                                xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
                                fp8_small_m.fp8_small_m(xq, xs, fp8_small_m.A_FP8_GROUP, *args[0], n, k, config=cfg)
                            t.append(None)
                            continue
                        t.append(safe_us(call))
                    if all(t):
                        results.append((sum(t), cfg, t))
        if not warm and results and not int4:  # the fused quantization's cost: the best config on pre-quantized x
            cfg = min(results, key=lambda r: r[0])[1]
            pre = []
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
                pre.append(safe_us([lambda a=a: fp8_small_m.fp8_small_m(
                    xq, xs, fp8_small_m.A_FP8_GROUP, a[0], a[1], a[2], a[3], n, k, config=cfg) for a in args]))
            print(f"  small_m fp8 {n}x{k} {cfg} on pre-quantized x: {pre} us", flush=True)
            out.setdefault("small_m_prequant", {})[f"{n}x{k}"] = (cfg, pre)
        results.sort(key=lambda r: r[0])
        floor = n * k * (0.5 if int4 else 1.0) / 3.0e6  # us at 3 TB/s
        if results:
            best[f"{n}x{k}"] = list(results[0][1])
            print(f"  small_m {'int4' if int4 else 'fp8'} {n}x{k}: best {results[0][1]} {results[0][2]} us "
                  f"(floor {floor:.1f} us); next {[(r[1], [round(v, 1) for v in r[2]]) for r in results[1:4]]}",
                  flush=True)
        out.setdefault("small_m_all", {})[f"{'int4' if int4 else 'fp8'}:{n}x{k}"] = [(r[1], r[2]) for r in results]
    return best


def _tune_block(out, int4: bool, shapes, ms=(128, 2048, 8192), warm=False):
    """Time fp8_block configs (BLOCK_M, BLOCK_N, GROUP_M, warps, stages, tma) against cuBLAS on one weight."""
    from lowbit.kernels import fp8_block
    from lowbit.kernels.fp8_gemm import fp8_linear
    from lowbit.kernels.quant_act import quantize_fp8

    configs = [(128, 128, 8, 8, 3), (128, 128, 8, 8, 4), (128, 256, 8, 8, 3), (128, 128, 8, 4, 4), (64, 128, 8, 4, 4),
               (256, 128, 8, 8, 3), (64, 64, 8, 4, 4)]
    configs = [c + (t,) for c in configs for t in ((False,) if int4 else (False, True))]
    res = {}
    for n, k in shapes:
        if int4:
            from lowbit.kernels.reference import pack_int32
            from lowbit.kernels.w4a8 import w4a8_repack

            w = w4a8_repack(pack_int32(torch.randint(0, 16, (n, k), device="cuda"), 4),
                            torch.rand(n, math.ceil(k / 128), device="cuda") * 1e-2, 128, k)
            wargs = (w.qweight, w.scales, w.rows)
        else:
            s = fp8_weight_sets(n, k, 1)[0]
            wargs = (s["w"], s["block"].grid, s["block"].grid_rows)
        one = torch.ones((), device="cuda")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
            cub = cub_block = None
            if not warm and not int4:  # the peers on the same fp8 weight
                cub = safe_us([lambda: torch._scaled_mm(xq, wargs[0].t(), one, one, out_dtype=torch.bfloat16)])
                cub_block = safe_us([lambda: fp8_linear(xq, s["block"], "token_group", x_scale=xs,
                                                        out_dtype=torch.bfloat16, candidate="cublas_block")])
            line = []
            for cfg in configs:
                def call(c=cfg):
                    return fp8_block.fp8_block_gemm(xq, xs, True, wargs[0], wargs[1], wargs[2], n, k, w_int4=int4,
                                                    config=c[:5], tma=c[5])
                if warm:
                    try:
                        call()
                    except Exception as exc:  # noqa: BLE001
                        print(f"  warm {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
                    continue
                us = safe_us([call])
                line.append((cfg, us))
                res.setdefault(f"{'int4' if int4 else 'fp8'}:{m}", []).append((f"{n}x{k}", cfg, us, cub, cub_block))
            if warm:
                continue
            ok = [c for c in line if c[1]]
            best = min(ok, key=lambda c: c[1]) if ok else None
            print(f"  block {'int4' if int4 else 'fp8'} {n}x{k} M={m}: cuBLAS tensor {cub} us, cuBLAS block {cub_block} "
                  f"us; best {best}; all {[(c[0], round(c[1], 1) if c[1] else None) for c in line]}", flush=True)
    out[f"block_{'int4' if int4 else 'fp8'}"] = res


def tune(out_dir: str, parts=("small_fp8", "small_int4", "block_fp8", "block_int4"), warm=False, shapes=None,
         block_shapes=None) -> dict:
    """Time kernel configs; warm=True only compiles them on tiny shapes (run it in parallel processes first)."""
    out: dict = {}
    t0 = time.time()
    shapes = [(256, 512)] if warm else shapes or [s for v in SHAPES.values() for s in v]
    if "small_fp8" in parts:
        out["small_m_fp8"] = _tune_small_m(out, False, shapes, warm=warm)
    if "small_int4" in parts:
        out["small_m_int4"] = _tune_small_m(out, True, shapes, warm=warm)
    if "block_fp8" in parts:
        _tune_block(out, False, [(256, 512)] if warm else block_shapes or [(2112, 7168), (7168, 16384), (4096, 7168)],
                    ms=(128,) if warm else (128, 2048, 8192), warm=warm)
    if "block_int4" in parts:
        _tune_block(out, True, [(256, 512)] if warm else (block_shapes or [(4096, 7168), (28672, 4096)])[:2],
                    ms=(128,) if warm else (2048, 8192), warm=warm)
    if warm:
        return out
    out["seconds"] = time.time() - t0
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fp8_tune.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def probe(out_dir: str) -> dict:
    """Which cuBLAS scaled-mm layouts this torch accepts (and whether they agree with the reference)."""
    F = torch.nn.functional
    res = {}

    def attempt(name, fn, ref):
        try:
            y = fn()
            torch.cuda.synchronize()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            res[name] = f"ok rel_err={err:.2e}"
        except Exception as exc:  # noqa: BLE001
            res[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"  probe {name}: {res[name]}", flush=True)

    for m, n, k in [(16, 2112, 7168), (32, 2112, 7168), (64, 2112, 7168), (128, 4096, 7168)]:
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        w = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        kb, nb = math.ceil(k / 128), math.ceil(n / 128)
        sa = torch.rand(kb, m, device="cuda").t() + 0.5  # [M, K/128] column-major
        sb = torch.rand(nb, kb, device="cuda") + 0.5
        sw = torch.rand(kb, n, device="cuda").t() + 0.5  # [N, K/128] column-major
        ref_a = a.float() * sa.repeat_interleave(128, 1)[:, :k]
        ref_b = w.float() * sb.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        attempt(f"block1x128x128x128 M{m} N{n} K{k}", lambda: F.scaled_mm(
            a, w.t(), sa, F.ScalingType.BlockWise1x128, sb.t(), F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16), ref_a @ ref_b.t())
        ref_w = w.float() * sw.repeat_interleave(128, 1)[:, :k]
        attempt(f"block1x128x1x128 M{m} N{n} K{k}", lambda: F.scaled_mm(
            a, w.t(), sa, F.ScalingType.BlockWise1x128, sw, F.ScalingType.BlockWise1x128,
            output_dtype=torch.bfloat16), ref_a @ ref_w.t())
    m, n, k = 64, 2048, 1024
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
    bias16, bias_bf = torch.randn(n, device="cuda", dtype=torch.float16), torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = (a.float() * sa) @ (w.float() * sb.t()).t()
    attempt("rowwise bf16", lambda: torch._scaled_mm(a, w.t(), sa, sb, out_dtype=torch.bfloat16), ref)
    attempt("rowwise fp16", lambda: torch._scaled_mm(a, w.t(), sa, sb, out_dtype=torch.float16), ref)
    attempt("rowwise bf16 bias", lambda: torch._scaled_mm(a, w.t(), sa, sb, bias=bias_bf, out_dtype=torch.bfloat16),
            ref + bias_bf.float())
    one = torch.ones((), device="cuda")
    attempt("tensor fp16 bias", lambda: torch._scaled_mm(a, w.t(), one, one, bias=bias16, out_dtype=torch.float16),
            a.float() @ w.float().t() + bias16.float())
    attempt("tensor M1", lambda: torch._scaled_mm(a[:1], w.t(), one, one, out_dtype=torch.bfloat16),
            a[:1].float() @ w.float().t())
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res
