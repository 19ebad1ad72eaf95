"""fp8 GEMM sweep: lowbit block-wise / per-channel / per-tensor fp8 vs cuBLAS bf16 and cuBLAS fp8 (tensor-wise).

Times come from CUDA-graph replays of several calls, each on its own copy of the weights (>= 3x L2 of
distinct bytes), so small-M numbers are HBM numbers, not L2 ones and not launch gaps. Columns:
  us          lowbit's GEMM alone (small_m where it quantizes in-kernel: the fused kernel from 16-bit x; else the
              GEMM the selection picks on pre-quantized x)     TFLOPs / GBps / pct_hbm / pct_fp8_peak of it
  pct_cublas  cuBLAS fp8 tensor-wise time / lowbit time (>= 0.85 is the block-wise target at M >= 2048)
  e2e_us      fp8_linear from 16-bit x (activation quantization included), vs bf16_us (cuBLAS bf16)
Also per M: each candidate forced (triton / cublas_block / small_m) for the selection table.
`tune(out)` sweeps kernel configs (used once to write lowbit/kernels/configs/fp8_*.json); `split_k_sweep` and
`retime` (python -m bench.kernels.fp8 sweep | retime) time the split-K kernel for M = 1..256 against its peers and
wrote configs/fp8_small_m.json and the thresholds of fp8_select.json; `warm_bench` compiles main()'s kernels in
parallel processes first. Over 500 lines because the tuning passes stay beside the benchmark whose timing they share.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from bench.common import copies_for as common_copies_for
from bench.common import graph_replay_us, print_table, rooflines, save_section

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
        bf16_us = safe_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
        cublas_us = safe_us([lambda s=s: torch._scaled_mm(xqt, s["w"].t(), one, one, out_dtype=dtype) for s in sets])
        cand = pick_candidate(sets[0]["block"], "token_group", m, dtype)
        if cand == "small_m" and fuses_quant(sets[0]["block"], "token_group", m):  # quantization inside the GEMM
            us = safe_us([lambda s=s: fp8_linear(x, s["block"], "token_group") for s in sets])
            e2e = us
        else:
            us = safe_us([lambda s=s: fp8_linear(xq, s["block"], "token_group", x_scale=xs, out_dtype=dtype,
                                                 candidate=cand) for s in sets])
            e2e = safe_us([lambda s=s: fp8_linear(x, s["block"], "token_group") for s in sets])
        extra = {}
        for forced in (["triton"] if m > 16 else []) + (["cublas_block"] if m >= 16 else []) + (
                ["small_m"] if 16 < m <= 256 else []):
            extra[f"{forced}_us"] = safe_us([lambda s=s, c=forced: fp8_linear(
                xq, s["block"], "token_group", x_scale=xs, out_dtype=dtype, candidate=c) for s in sets])
        for scheme, act in (("channel", "token"), ("tensor", "tensor_static")):
            scale = xst if act == "tensor_static" else None
            extra[f"{scheme}_e2e_us"] = safe_us([lambda s=s: fp8_linear(x, s[scheme], act, scale) for s in sets])
            extra[f"{scheme}_cand"] = pick_candidate(sets[0][scheme], act, m, dtype)
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


# ---- config tuning (run once per GPU; results become lowbit/kernels/configs/*.json) -----------------


def _tune_small_m(out, shapes, ms=(1, 16), warm=False):
    from lowbit.kernels import fp8_small_m
    from lowbit.kernels.quant_act import quantize_fp8

    best = {}
    for n, k in shapes:
        sets = fp8_weight_sets(n, k, copies_for(n * k))
        args = [(s["w"], s["block"].grid, s["block"].grid_rows, s["block"].counters) for s in sets]

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
                            x, None, fp8_small_m.A_DYN_GROUP, a[0], a[1], a[2], a[3], n, k,
                            config=cfg) for a in args]
                        if warm:  # compile only (fills the on-disk Triton cache for the timed pass)
                            call[0]()
                            xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
                            fp8_small_m.fp8_small_m(xq, xs, fp8_small_m.A_FP8_GROUP, *args[0], n, k, config=cfg)
                            t.append(None)
                            continue
                        t.append(safe_us(call))
                    if all(t):
                        results.append((sum(t), cfg, t))
        if not warm and results:  # the fused quantization's cost: the best config on pre-quantized x
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
        floor = n * k / 3.0e6  # us at 3 TB/s
        if results:
            best[f"{n}x{k}"] = list(results[0][1])
            print(f"  small_m fp8 {n}x{k}: best {results[0][1]} {results[0][2]} us "
                  f"(floor {floor:.1f} us); next {[(r[1], [round(v, 1) for v in r[2]]) for r in results[1:4]]}",
                  flush=True)
        out.setdefault("small_m_all", {})[f"fp8:{n}x{k}"] = [(r[1], r[2]) for r in results]
    return best


def _tune_block(out, shapes, ms=(128, 2048, 8192), warm=False):
    """Time fp8_block configs (BLOCK_M, BLOCK_N, GROUP_M, warps, stages, tma) against cuBLAS on one weight."""
    from lowbit.kernels import fp8_block
    from lowbit.kernels.fp8_gemm import fp8_linear
    from lowbit.kernels.quant_act import quantize_fp8

    configs = [(128, 128, 8, 8, 3), (128, 128, 8, 8, 4), (128, 256, 8, 8, 3), (128, 128, 8, 4, 4), (64, 128, 8, 4, 4),
               (256, 128, 8, 8, 3), (64, 64, 8, 4, 4)]
    configs = [c + (t,) for c in configs for t in (False, True)]
    res = {}
    for n, k in shapes:
        s = fp8_weight_sets(n, k, 1)[0]
        wargs = (s["w"], s["block"].grid, s["block"].grid_rows)
        one = torch.ones((), device="cuda")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
            cub = cub_block = None
            if not warm:  # the peers on the same fp8 weight
                cub = safe_us([lambda: torch._scaled_mm(xq, wargs[0].t(), one, one, out_dtype=torch.bfloat16)])
                cub_block = safe_us([lambda: fp8_linear(xq, s["block"], "token_group", x_scale=xs,
                                                        out_dtype=torch.bfloat16, candidate="cublas_block")])
            line = []
            for cfg in configs:
                def call(c=cfg):
                    return fp8_block.fp8_block_gemm(xq, xs, True, wargs[0], wargs[1], wargs[2], n, k,
                                                    config=c[:5], tma=c[5])
                if warm:
                    try:
                        call()
                    except Exception as exc:  # noqa: BLE001
                        print(f"  warm {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
                    continue
                us = safe_us([call])
                line.append((cfg, us))
                res.setdefault(f"fp8:{m}", []).append((f"{n}x{k}", cfg, us, cub, cub_block))
            if warm:
                continue
            ok = [c for c in line if c[1]]
            best = min(ok, key=lambda c: c[1]) if ok else None
            print(f"  block fp8 {n}x{k} M={m}: cuBLAS tensor {cub} us, cuBLAS block {cub_block} "
                  f"us; best {best}; all {[(c[0], round(c[1], 1) if c[1] else None) for c in line]}", flush=True)
    out["block_fp8"] = res


def tune(out_dir: str, parts=("small_fp8", "block_fp8"), warm=False, shapes=None,
         block_shapes=None) -> dict:
    """Time kernel configs; warm=True only compiles them on tiny shapes (run it in parallel processes first)."""
    out: dict = {}
    t0 = time.time()
    shapes = [(256, 512)] if warm else shapes or [s for v in SHAPES.values() for s in v]
    if "small_fp8" in parts:
        out["small_m_fp8"] = _tune_small_m(out, shapes, warm=warm)
    if "block_fp8" in parts:
        _tune_block(out, [(256, 512)] if warm else block_shapes or [(2112, 7168), (7168, 16384), (4096, 7168)],
                    ms=(128,) if warm else (128, 2048, 8192), warm=warm)
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


# ---- split-K sweep (small and mid M; results become configs/fp8_small_m.json and fp8_select.json) ----------

SWEEP_SHAPES = QUICK_SHAPES + [s for v in SHAPES.values() for s in v if s not in QUICK_SHAPES]
WS_SMALL = ((4, 3), (4, 4), (4, 6), (8, 3), (8, 4))
WS_MID = ((4, 3), (8, 3), (8, 4))


def _splits_for(k, ctas_per_split, targets, sms=132):
    kb = math.ceil(k / 128)
    return sorted({max(1, min(kb, 32, round(t * sms / ctas_per_split))) for t in targets})


def sweep_jobs(shapes=None) -> list[tuple]:
    """(priority, n, k, m, a_mode, cfg) for the split-K kernel; a_mode 3 = fused token_group, 1 = pre-quantized."""
    jobs = []
    for rank, (n, k) in enumerate(shapes or SWEEP_SHAPES):
        for m in (1, 16):
            for bn in (32, 64, 128):
                for s in _splits_for(k, math.ceil(n / bn), (1, 2, 3, 4, 6)):
                    for w, st in WS_SMALL:
                        if bn == 32 and w == 8:
                            continue
                        jobs.append((rank, n, k, m, 3, (bn, s, w, st)))
        for m in (32, 64, 128, 256):
            caps = [c for c in (32, 64, 128) if c <= max(32, m)]
            for mode in ((3, 1) if m <= 64 else (1,)):
                for bn in (64, 128):
                    for cap in (caps if mode == 1 else [min(m, 64)]):
                        tiles = math.ceil(n / bn) * math.ceil(m / min(cap, m))
                        for s in _splits_for(k, tiles, (1, 2, 3)):
                            for w, st in WS_MID:
                                if bn * min(cap, m) >= 16384 and w == 4:
                                    continue
                                jobs.append((rank + 0.5, n, k, m, mode, (bn, s, w, st, cap)))
    return sorted(jobs, key=lambda j: j[0])


def _sweep_worker(args):
    """Compile only (fills the on-disk Triton cache for the timed pass); one process per slice of jobs."""
    jobs, idx, dev = args
    import torch as _t

    from lowbit.kernels import fp8_small_m
    from lowbit.kernels.quant_act import quantize_fp8

    cache = {}
    for _, n, k, m, mode, cfg in jobs:
        if (n, k) not in cache:
            cache.clear()
            cache[(n, k)] = fp8_weight_sets(n, k, 1, dev)[0]["block"]
        W = cache[(n, k)]
        x = _t.randn(m, k, device=dev, dtype=_t.bfloat16)
        xs = None
        if mode == 1:
            x, xs = quantize_fp8(x, "token_group", column_major_scales=True)
        try:
            fp8_small_m.fp8_small_m(x, xs, mode, W.weight, W.grid, W.grid_rows, W.counters, n, k, config=cfg)
        except Exception as exc:  # noqa: BLE001
            print(f"  warm {n}x{k} M={m} mode {mode} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    if dev == "cuda":
        _t.cuda.synchronize()
    return idx


def split_k_sweep(out_dir: str, budget_s: float = 140, workers: int = 12, shapes=None, old_module=None,
                  wait_for: str | None = None, jobs: list | None = None, dev: str = "cuda", peers: bool = True) -> dict:
    """Time every split-K config of sweep_jobs (compiled first in `workers` processes), the peers per (shape, M)
    (cuBLAS bf16, cuBLAS fp8 tensor-wise and block-wise, the Triton block GEMM, quantize_fp8) and, given the
    committed kernel as old_module, its configs; stops starting shapes after budget_s. Writes fp8_sweep.json.
    wait_for: a file whose appearance the timed pass waits for (GPU tests sharing the compile phase)."""
    import importlib.util
    import multiprocessing as mp

    want_peers = peers

    from lowbit.kernels import fp8_small_m
    from lowbit.kernels.fp8_gemm import fp8_linear, load_config
    from lowbit.kernels.quant_act import quantize_fp8

    t0 = time.time()
    jobs = jobs or sweep_jobs(shapes)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for _ in pool.imap_unordered(_sweep_worker, [(jobs[i::workers], i, dev) for i in range(workers)]):
            pass
    print(f"compiled {len(jobs)} jobs in {time.time() - t0:.0f} s", flush=True)
    while wait_for and not os.path.exists(wait_for) and time.time() - t0 < budget_s:
        time.sleep(1)
    print(f"timing from {time.time() - t0:.0f} s", flush=True)
    old = None
    if old_module and os.path.exists(old_module):
        spec = importlib.util.spec_from_file_location("old_fp8_small_m", old_module)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    out = {"jobs": [], "peers": {}, "copy_GBps": None}
    if dev == "cuda":
        from bench.common import measure_copy_gbps

        out["copy_GBps"] = measure_copy_gbps()
        print(f"copy {out['copy_GBps']:.0f} GB/s", flush=True)
    path = os.path.join(out_dir, "fp8_sweep.json")
    os.makedirs(out_dir, exist_ok=True)
    one = torch.ones((), device=dev)
    by_shape: dict = {}
    for j in jobs:
        by_shape.setdefault((j[1], j[2]), []).append(j)
    for (n, k), sjobs in by_shape.items():
        if time.time() - t0 > budget_s:
            print(f"budget: skipped {n}x{k}", flush=True)
            continue
        sets = fp8_weight_sets(n, k, copies_for(n * k), dev)
        Ws = [s["block"] for s in sets]
        xs_by_m = {}
        for m in sorted({j[3] for j in sjobs}):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
            xqt, _ = quantize_fp8(x, "tensor_dynamic")
            xs_by_m[m] = (x, xq, xs)
            peers = {}
            if want_peers and ((n, k) in QUICK_SHAPES or m in (1, 16, 64, 256)):
                bf16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
                peers["bf16"] = safe_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
                del bf16
                peers["cublas_fp8"] = safe_us([lambda s=s: torch._scaled_mm(xqt, s["w"].t(), one, one,
                                                                           out_dtype=torch.bfloat16) for s in sets])
                peers["quant_group"] = safe_us([lambda: quantize_fp8(x, "token_group", column_major_scales=True)])
                peers["quant_token"] = safe_us([lambda: quantize_fp8(x, "token")])
                if m >= 16:
                    peers["cublas_block"] = safe_us([lambda W=W: fp8_linear(
                        xq, W, "token_group", x_scale=xs, out_dtype=torch.bfloat16, candidate="cublas_block")
                        for W in Ws])
                    peers["triton"] = safe_us([lambda W=W: fp8_linear(
                        xq, W, "token_group", x_scale=xs, out_dtype=torch.bfloat16, candidate="triton") for W in Ws])
                    peers["cublas_row_e2e"] = safe_us([lambda s=s: fp8_linear(x, s["channel"], "token",
                                                                              candidate="cublas") for s in sets])
                if old is not None and m <= 64:
                    cfg = load_config("fp8_small_m").get(f"{n}x{k}")
                    cfg = tuple(cfg) if cfg and not isinstance(cfg, dict) else None
                    if m <= 32:
                        peers["old_fused"] = safe_us([lambda W=W: old.fp8_small_m(
                            x, None, 3, W.weight, W.grid, W.grid_rows, W.counters, n, k, config=cfg) for W in Ws])
                    peers["old_pre"] = safe_us([lambda W=W: old.fp8_small_m(
                        xq, xs, 1, W.weight, W.grid, W.grid_rows, W.counters, n, k, config=cfg) for W in Ws])
                print(f"  peers {n}x{k} M={m}: {peers}", flush=True)
            out["peers"][f"{n}x{k}:{m}"] = peers
        for _, _, _, m, mode, cfg in sjobs:
            x, xq, xs = xs_by_m[m]
            a, s_ = (x, None) if mode == 3 else (xq, xs)
            us = safe_us([lambda W=W: fp8_small_m.fp8_small_m(a, s_, mode, W.weight, W.grid, W.grid_rows, W.counters,
                                                              n, k, config=cfg) for W in Ws])
            out["jobs"].append((n, k, m, mode, list(cfg), us))
        best = {}
        for n_, k_, m, mode, cfg, us in out["jobs"]:
            if (n_, k_) == (n, k) and us and (us < best.get((m, mode), (1e9,))[0]):
                best[(m, mode)] = (us, cfg)
        for (m, mode), (us, cfg) in sorted(best.items()):
            x, xq, xs = xs_by_m[m]  # the winner against the Triton block GEMM on the same e4m3 x
            y = fp8_small_m.fp8_small_m(xq, xs, 1, Ws[0].weight, Ws[0].grid, Ws[0].grid_rows, Ws[0].counters, n, k,
                                        config=tuple(cfg)).float()
            y_ref = fp8_linear(xq, Ws[0], "token_group", x_scale=xs, out_dtype=torch.float32, candidate="triton")
            err = ((y - y_ref).norm() / y_ref.norm()).item()
            out.setdefault("best", []).append((n, k, m, mode, cfg, us, err))
            print(f"  best {n}x{k} M={m} mode {mode}: {us:.2f} us {cfg} rel err {err:.1e} (floor {n * k / 3.35e6:.1f} us "
                  f"at 3.35 TB/s)", flush=True)
        with open(path, "w") as f:
            json.dump(out, f)
        del sets, Ws
        if dev == "cuda":
            torch.cuda.empty_cache()
    out["seconds"] = time.time() - t0
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def _warm_worker(args):
    global _WARM
    items, roof = args
    _WARM = True
    for n, k, m, name in items:
        bench_shape(n, k, [m], roof, name)
    return len(items)


def warm_bench(workers: int = 12, quick: bool = True) -> None:
    """Compile what main() will run, in parallel processes (main then loads it from the Triton cache)."""
    import multiprocessing as mp

    ms = M_QUICK if quick else M_ALL
    items = [(n, k, m, f"{fam}:{n}x{k}") for fam, shapes in SHAPES.items() for n, k in shapes
             if not quick or (n, k) in QUICK_SHAPES for m in ms]
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        list(pool.imap_unordered(_warm_worker, [(items[i::workers], {}) for i in range(workers)]))
    print(f"warm_bench: {len(items)} (shape, M) in {time.time() - t0:.0f} s", flush=True)


def retime(prev: str, out_dir: str, config_path: str | None = None, budget_s: float = 60, workers: int = 12,
           wait_for: str | None = None, top: int = 3) -> dict:
    """Second pass over split_k_sweep's results (prev): its `top` configs per (shape, M) in the activation mode
    the selection runs there (fused up to fused_quant_max, else pre-quantized), plus the best with 1.5x / 2x the
    splits, timed again; writes the winners per M bucket to config_path (shapes past the budget keep prev's)."""
    from lowbit.kernels.fp8_gemm import _DEFAULT_SELECT, load_config

    t0 = time.time()
    d = json.load(open(prev))
    sel = {**_DEFAULT_SELECT, **load_config("fp8_select")}
    shapes_sel = load_config("fp8_select").get("block", {}).get("shapes", {})
    ranked: dict = {}
    for n, k, m, mode, cfg, us in d["jobs"]:
        fq = shapes_sel.get(f"{n}x{k}", {}).get("fused_quant_max", sel["fused_quant_max"])
        if us and mode == (3 if m <= fq else 1):
            ranked.setdefault((n, k, m, mode), []).append((us, tuple(cfg[:4]) + (cfg[4] if len(cfg) > 4 else 64,)))
    jobs = []
    for (n, k, m, mode), rows in sorted(ranked.items(), key=lambda t: SWEEP_SHAPES.index(t[0][:2])):
        rows.sort()
        cfgs = {c for _, c in rows[:top]}
        c = rows[0][1]
        for f in (1.5, 2.0):
            cfgs.add((c[0], min(math.ceil(k / 128), 32, max(c[1] + 1, round(c[1] * f)))) + c[2:])
        jobs += [(SWEEP_SHAPES.index((n, k)), n, k, m, mode, cfg) for cfg in sorted(cfgs)]
    res = split_k_sweep(out_dir, budget_s, workers, jobs=jobs, wait_for=wait_for, peers=False)
    best: dict = {}
    for n, k, m, mode, cfg, us in res["jobs"]:
        if us and us < best.get((n, k, m), (1e9,))[0]:
            best[(n, k, m)] = (us, cfg)
    for (n, k, m, _), rows in ranked.items():
        if (n, k, m) not in best:
            best[(n, k, m)] = (rows[0][0], list(rows[0][1]))
    table = {"_source": f"bench/kernels/fp8.py split_k_sweep + retime on {torch.cuda.get_device_name()}: (BLOCK_N, "
                        "splits, warps, stages, BLOCK_M cap) with the lowest time per shape and M bucket"}
    for (n, k, m), (us, cfg) in sorted(best.items()):
        table.setdefault(f"{n}x{k}", {})[str(m)] = list(cfg)
    if config_path:
        with open(config_path, "w") as f:
            json.dump(table, f, indent=1)
    print(f"retime: {len(best)} (shape, M) in {time.time() - t0:.0f} s", flush=True)
    return table


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.kernels.fp8")
    parser.add_argument("what", choices=["sweep", "retime", "warm_bench"])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--budget", type=float, default=140)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--old", default=None, help="sweep: the committed fp8_small_m.py, timed at its configs")
    parser.add_argument("--prev", default=None, help="retime: fp8_sweep.json of a split_k_sweep run")
    parser.add_argument("--config", default=None, help="retime: write the winners here (fp8_small_m.json)")
    parser.add_argument("--wait-for", default=None, help="start timing once this file exists")
    a = parser.parse_args()
    if a.what == "sweep":
        split_k_sweep(a.out, a.budget, a.workers, old_module=a.old, wait_for=a.wait_for)
    elif a.what == "retime":
        retime(a.prev, a.out, a.config, a.budget, a.workers, wait_for=a.wait_for)
    else:
        warm_bench(a.workers)
