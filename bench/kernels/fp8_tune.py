"""fp8 kernel tuning passes (run once per GPU; they wrote lowbit/kernels/configs/fp8_*.json), timed as bench/kernels/fp8.py.

`tune(out)` sweeps kernel configs; `split_k_sweep` and `retime` (python -m bench.kernels.fp8_tune sweep | retime) time
the split-K kernel for M = 1..256 against its peers and wrote configs/fp8_small_m.json and the thresholds of
fp8_select.json; `split_tune` (python -m bench.kernels.fp8_tune split_tune) times cuBLAS block-wise split over K / N on
side streams and PDL for small_m, and writes those choices and the small_m crossover into the configs; `rows_tune`
(python -m bench.kernels.fp8_tune rows_tune) times cuBLAS block-wise with the weight scales expanded to rows (1x128
x 1x128) against the current call and per-tensor cuBLAS fp8, and writes its M ranges into fp8_select.json; `row_tune`
(python -m bench.kernels.fp8_tune row_tune) times small_m launch configs for per-tensor / per-channel weights at
M = 1 / 16 and writes fp8_small_m.json "row_scale"; `warm_bench` compiles the benchmark's kernels in parallel
processes first.
"""

from __future__ import annotations

import json
import math
import os
import re
import time

import torch

import bench.kernels.fp8 as fp8_bench
from bench.kernels.fp8 import QUICK_SHAPES, SHAPES, copies_for, fp8_weight_sets, safe_us


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
    items, roof = args
    fp8_bench._WARM = True  # the benchmark module's compile-only switch
    for n, k, m, name in items:
        fp8_bench.bench_shape(n, k, [m], roof, name)
    return len(items)


def warm_bench(workers: int = 12, quick: bool = True) -> None:
    """Compile what main() will run, in parallel processes (main then loads it from the Triton cache)."""
    import multiprocessing as mp

    ms = fp8_bench.M_QUICK if quick else fp8_bench.M_ALL
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
    table = {"_source": f"bench/kernels/fp8_tune.py split_k_sweep + retime on {torch.cuda.get_device_name()}: (BLOCK_N, "
                        "splits, warps, stages, BLOCK_M cap) with the lowest time per shape and M bucket"}
    for (n, k, m), (us, cfg) in sorted(best.items()):
        table.setdefault(f"{n}x{k}", {})[str(m)] = list(cfg)
    if config_path:
        with open(config_path, "w") as f:
            json.dump(table, f, indent=1)
    print(f"retime: {len(best)} (shape, M) in {time.time() - t0:.0f} s", flush=True)
    return table


# ---- split cuBLAS block-wise calls and PDL (results become fp8_select.json block shapes, fp8_small_m.json) ----------

SPLIT_SHAPES = QUICK_SHAPES + [(7168, 2048)]


def _write_config(name: str, update) -> dict:
    from lowbit.kernels.fp8_gemm import CONFIG_DIR

    path = os.path.join(CONFIG_DIR, f"{name}.json")
    cfg = json.load(open(path)) if os.path.exists(path) else {}
    update(cfg)
    text = json.dumps(cfg, indent=1)  # config lists (kernel tuples) back on one line each, as written by hand
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda mt: "[" + re.sub(r",\s+", ", ", mt.group(1)) + "]", text)
    with open(path, "w") as f:
        f.write(text + "\n")
    return cfg


def split_tune(out_dir: str, budget_s: float = 80) -> dict:
    """Per shape and M: cuBLAS block-wise in 1/2/4/7 K pieces on side streams (GEMM alone) and with the N rows past
    the last whole 128 beside it; quantize_fp8 alone; small_m end to end (M <= 256); small_m at M = 1 / 16 with and
    without programmatic dependent launch (twice each, the lower kept). Writes the measured choices into
    configs/fp8_select.json (cublas_block_split_k, cublas_block_split_n_min_m, small_m_max / cublas_block_min_m)
    and the pdl flag of configs/fp8_small_m.json, and everything timed into <out_dir>/fp8_split_tune.json."""
    from lowbit.kernels import fp8_small_m
    from lowbit.kernels.fp8_gemm import _cublas_block, fp8_linear, small_m_config
    from lowbit.kernels.quant_act import quantize_fp8

    t0 = time.time()
    res: dict = {}
    select: dict = {}
    pdl_on: dict = {}
    for n, k in SPLIT_SHAPES:
        if time.time() - t0 > budget_s:
            print(f"split_tune: budget, skipped {n}x{k}", flush=True)
            continue
        Ws = [s["block"] for s in fp8_weight_sets(n, k, copies_for(n * k))]
        rows = res.setdefault(f"{n}x{k}", {})
        for m in (1, 16):  # PDL on the selection's small_m path (fused quantization at these M)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = tuple(small_m_config(n, k, m))[:5]
            t = {False: [], True: []}
            for pdl in (False, True, False, True):
                t[pdl].append(safe_us([lambda W=W: fp8_small_m.fp8_small_m(
                    x, None, fp8_small_m.A_DYN_GROUP, W.weight, W.grid, W.grid_rows, W.counters, n, k, config=cfg,
                    pdl=pdl) for W in Ws]) or float("inf"))
            rows[f"pdl:{m}"] = t
            pdl_on[(n, k, m)] = min(t[True]) < 0.97 * min(t[False])
            print(f"  {n}x{k} M={m} {cfg}: pdl off {t[False]} on {t[True]} -> {pdl_on[(n, k, m)]}", flush=True)
        split_k, cb_e2e, sm_e2e = {}, {}, {}
        for m in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
            if m > 1024 and n % 128 == 0:  # above 1024 only the N split is tuned
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
            r = {"quant": safe_us([lambda: quantize_fp8(x, "token_group", column_major_scales=True)]) or 0.0}
            pieces = [p for p in (1, 2, 4, 7) if p <= k // 512] if m <= 1024 else [1]
            for p in pieces:
                r[f"k{p}"] = safe_us([lambda W=W, p=p: _cublas_block(xq, xs, W, None, torch.bfloat16, p) for W in Ws])
            if n % 128 and m >= 256:
                r["n"] = safe_us([lambda W=W: _cublas_block(xq, xs, W, None, torch.bfloat16, 1, True) for W in Ws])
            if m <= 256:
                r["small_m_e2e"] = safe_us([lambda W=W: fp8_linear(x, W, "token_group", candidate="small_m")
                                            for W in Ws])
            timed = [p for p in pieces if r.get(f"k{p}")]
            best_p = min(timed, key=lambda p: r[f"k{p}"]) if timed else 1
            if best_p > 1 and r.get("k1") and r[f"k{best_p}"] > 0.95 * r["k1"]:
                best_p = 1
            split_k[m] = best_p
            cb_e2e[m] = r["quant"] + (r.get(f"k{best_p}") or float("inf"))
            if r.get("small_m_e2e"):
                sm_e2e[m] = r["small_m_e2e"]
            rows[str(m)] = r
            print(f"  {n}x{k} M={m}: {r} -> split_k {best_p}", flush=True)
        entry: dict = {"cublas_block_split_k": {str(m): p for m, p in split_k.items() if m <= 1024}}
        if not any(p > 1 for p in entry["cublas_block_split_k"].values()):
            entry.pop("cublas_block_split_k")
        wins_n = [m for m in (256, 512, 1024, 2048, 4096, 8192) if rows.get(str(m), {}).get("n")
                  and rows[str(m)]["n"] < 0.97 * (rows[str(m)].get(f"k{split_k[m]}") or float("inf"))]
        tail = [m for m in wins_n if all(mm in wins_n for mm in (256, 512, 1024, 2048, 4096, 8192) if mm >= m)]
        if tail:
            entry["cublas_block_split_n_min_m"] = min(tail)
        small_max = 15  # cuBLAS block-wise from M = 16 (fp8_gemm.CUBLAS_BLOCK_MIN_M)
        for m in (16, 32, 64, 128, 256):
            if m in sm_e2e and sm_e2e[m] <= cb_e2e[m]:
                small_max = m
            else:
                break
        entry.update(small_m_max=small_max, cublas_block_min_m=small_max + 1)
        select[f"{n}x{k}"] = entry
        print(f"  {n}x{k}: {entry}", flush=True)
        del Ws
        torch.cuda.empty_cache()

    def upd_select(cfg):
        shapes = cfg.setdefault("block", {}).setdefault("shapes", {})
        for key, entry in select.items():
            old = {kk: v for kk, v in shapes.get(key, {}).items()
                   if kk not in ("cublas_block_split_k", "cublas_block_split_n_min_m")}
            shapes[key] = {**old, **entry}
        cfg["_split_source"] = (f"bench/kernels/fp8_tune.py split_tune on {torch.cuda.get_device_name()}: cuBLAS block-wise "
                                "split_k / split_n and the small_m crossover per shape (fp8_split_tune.json)")

    def upd_small(cfg):
        for (n, k, m), on in pdl_on.items():
            entry = cfg.get(f"{n}x{k}")
            if isinstance(entry, dict) and str(m) in entry:
                entry[str(m)] = list(entry[str(m)][:5]) + ([True] if on else [])
        cfg["_pdl_source"] = ("bench/kernels/fp8_tune.py split_tune: 6th element true where programmatic dependent launch "
                              "measured >= 3% faster (back-to-back CUDA graph replays)")

    if select:
        _write_config("fp8_select", upd_select)
    if pdl_on:
        _write_config("fp8_small_m", upd_small)
    res["seconds"] = time.time() - t0
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fp8_split_tune.json"), "w") as f:
        json.dump({"rows": res, "select": select, "pdl": {f"{n}x{k}:{m}": v for (n, k, m), v in pdl_on.items()},
                   "device": torch.cuda.get_device_name()}, f, indent=1)
    print(f"split_tune: {time.time() - t0:.0f} s", flush=True)
    return select


# ---- the rows variant of the cuBLAS block-wise call (results become fp8_select.json cublas_block_rows*_m) ----------

ROWS_MS = (128, 256, 512, 1024, 2048, 4096, 8192)
ROWS_KEYS = ("cublas_block_rows_m", "cublas_block_rows_split_n_m")


def longest_run(picks, want: str):
    """The longest run of consecutive measured M whose pick is `want` (picks: [(M, pick), ...] by M; ties: the
    larger M) as [lo, hi], or None."""
    runs, cur = [], []
    for m, c in picks:
        if c == want:
            cur.append(m)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    best = max(runs, key=lambda r: (len(r), r[-1])) if runs else None
    return [best[0], best[-1]] if best else None


def _rows_range(choice: dict, want: str):
    """longest_run over ROWS_MS, hi None when the run reaches the largest M measured (no upper bound)."""
    rng = longest_run([(m, choice.get(m)) for m in ROWS_MS], want)
    return rng and [rng[0], None if rng[1] == ROWS_MS[-1] else rng[1]]


def rows_tune(out_dir: str, budget_s: float = 240, passes: int = 2, shapes=None, confirm: bool = False) -> dict:
    """Per block-weight sweep shape and M = 128..8192, the GEMM alone on e4m3 x, each by CUDA-graph replay over
    rotated weight copies, in `passes` rounds (variants interleaved): the current cuBLAS block-wise call (its
    split_k / split_n table, 128x128 weight scales), rows (fp8_gemm._rows_scales, with the same split_k), rows +
    split_n (N % 128 != 0) and per-tensor cuBLAS fp8 (torch._scaled_mm, the peer). A rows variant is kept at an M
    where it is the fastest and >= 3% faster than the current call in every round; the longest run of such M becomes
    block.shapes["NxK"].cublas_block_rows_m / cublas_block_rows_split_n_m in configs/fp8_select.json (keys of shapes
    without one removed), everything timed goes to <out_dir>/fp8_rows_tune.json. confirm: a second run, in a new
    process, keeps only the M inside the ranges the config already holds (the first run's) that win again."""
    from lowbit.kernels.fp8_gemm import _cublas_block, _split_table
    from lowbit.kernels.quant_act import quantize_fp8

    t0 = time.time()
    shapes = shapes or [s for v in SHAPES.values() for s in v]
    res: dict = {}
    select: dict = {}
    table = []
    one = torch.ones((), device="cuda")
    for n, k in shapes:
        if time.time() - t0 > budget_s:
            print(f"rows_tune: budget, skipped {n}x{k}", flush=True)
            continue
        Ws = [s["block"] for s in fp8_weight_sets(n, k, copies_for(n * k))]
        buckets, split_n_min_m, *prev = _split_table(n, k)  # prev: the configured rows, rows + split_n M ranges
        rows = res.setdefault(f"{n}x{k}", {})
        choice = {}
        for m in ROWS_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
            split_k = next((p for b, p in buckets if m <= b), 1)
            variants = {"current": (split_k, m >= split_n_min_m, False), "rows": (split_k, False, True)}
            if n % 128:
                variants["rows_split_n"] = (split_k, True, True)
            t: dict = {v: [] for v in (*variants, "tensor")}
            for _ in range(passes):
                for v, args in variants.items():
                    t[v].append(safe_us([lambda W=W, a=args: _cublas_block(xq, xs, W, None, torch.bfloat16, *a)
                                         for W in Ws]) or float("inf"))
                t["tensor"].append(safe_us([lambda W=W: torch._scaled_mm(xq, W.weight.t(), one, one,
                                                                         out_dtype=torch.bfloat16) for W in Ws]))
            mean = {v: sum(ts) / len(ts) for v, ts in t.items() if all(ts)}
            best = min((v for v in variants if v in mean), key=lambda v: mean[v], default="current")
            win = best != "current" and all(a < 0.97 * c for a, c in zip(t[best], t["current"]))
            if confirm:
                win = win and prev[best == "rows_split_n"][0] <= m <= prev[best == "rows_split_n"][1]
            choice[m] = best if win else "current"
            tensor = mean.get("tensor")
            r = {"split_k": split_k, "us": t, "choice": choice[m],
                 "pct_tensor_before": 100 * tensor / mean["current"] if tensor and "current" in mean else None,
                 "pct_tensor_after": 100 * tensor / mean[choice[m]] if tensor and choice[m] in mean else None}
            rows[str(m)] = r
            table.append((f"{n}x{k}", m, *(mean.get(v) for v in ("current", "rows", "rows_split_n", "tensor")),
                          r["pct_tensor_before"], r["pct_tensor_after"], choice[m]))
            print(f"  {n}x{k} M={m}: " + ", ".join(f"{v} {[round(x, 1) for x in ts]}" for v, ts in t.items())
                  + f" -> {choice[m]}", flush=True)
        entry = {key: rng for key, want in zip(ROWS_KEYS, ("rows", "rows_split_n"))
                 if (rng := _rows_range(choice, want))}
        select[f"{n}x{k}"] = entry
        print(f"  {n}x{k}: {entry or 'no rows range'}", flush=True)
        del Ws
        torch.cuda.empty_cache()
    print("shape M current_us rows_us rows_split_n_us tensor_us pct_tensor_before pct_tensor_after choice")
    for row in table:
        print("  ".join("-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v) for v in row))
    dev = torch.cuda.get_device_name()

    def upd_select(cfg):
        shapes_cfg = cfg.setdefault("block", {}).setdefault("shapes", {})
        for key, entry in select.items():
            old = {kk: v for kk, v in shapes_cfg.get(key, {}).items() if kk not in ROWS_KEYS}
            if old or entry:
                shapes_cfg[key] = {**old, **entry}
        cfg["_rows_source"] = (
            f"bench/kernels/fp8_tune.py rows_tune on {dev}, {time.strftime('%Y-%m-%d')}: cuBLAS block-wise GEMM on "
            "e4m3 x, BlockWise1x128 x BlockWise128x128 (with the split table) vs the weight scales repeated per row "
            f"(BlockWise1x128 x BlockWise1x128, +split_n), CUDA-graph replay over rotated weight copies, {passes} "
            "rounds; a range where rows was fastest and >= 3% faster in every round"
            + (", confirmed by a second run" if confirm else "") + " (fp8_rows_tune.json)")

    return _save_select("rows_tune", out_dir, select, upd_select, res, dev, t0)


def _save_select(name: str, out_dir: str, select: dict, upd_select, res: dict, dev: str, t0: float) -> dict:
    """Writes a tuning pass's choices into fp8_select.json (when it made any) and everything it timed into
    <out_dir>/fp8_<name>.json."""
    if select:
        _write_config("fp8_select", upd_select)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"fp8_{name}.json"), "w") as f:
        json.dump({"rows": res, "select": select, "device": dev, "seconds": time.time() - t0}, f, indent=1)
    print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    return select


# ---- joint mid-M choice: small_m vs every cuBLAS block-wise call form (fp8_select.json cublas_block_calls) ----------

MID_MS = (16, 32, 64, 128, 256, 512, 1024)


def _call_forms(n: int, k: int) -> list[tuple[int, bool, bool]]:
    """(split_k, split_n, rows) forms of fp8_gemm._cublas_block for one shape (split_n only beside one K piece)."""
    forms = [(p, False, rows) for p in (1, 2, 4) if p <= k // 512 for rows in (False, True)]
    if n % 128:
        forms += [(1, True, False), (1, True, True)]
    return forms


def mid_tune(out_dir: str, budget_s: float = 300, passes: int = 2, shapes=None) -> dict:
    """Per block-weight shape and M = 16..1024, end to end from bf16 x (activation quantization included), all timed
    against each other in `passes` interleaved rounds (bench.common.Interleaved, rotated weight copies): small_m as
    the selection runs it (M <= 256) and quantize_fp8 + cuBLAS block-wise in every call form of _call_forms; bf16 and
    per-tensor fp8 cuBLAS beside them as peers. split_tune and rows_tune chose split_k and rows one at a time, each
    with the other fixed; here every combination competes (H200, 2112x7168 M = 256: rows alone 13.0 us where the
    table's split_k 2 took 21.2). The fastest form by mean becomes the shape's bucket of
    block.shapes["NxK"].cublas_block_calls {"<M>": [split_k, split_n, rows]} and small_m keeps the M from 16 up
    where it is faster than that; a choice that differs from the current selection is kept only where it is >= 3%
    faster in every round. Everything timed goes to <out_dir>/fp8_mid_tune.json."""
    from bench.common import Interleaved
    from lowbit.kernels.fp8_gemm import _cublas_block, cublas_block_split, fp8_linear, pick_candidate
    from lowbit.kernels.quant_act import quantize_fp8

    t0 = time.time()
    shapes = shapes or [s for v in SHAPES.values() for s in v]
    res: dict = {}
    select: dict = {}
    one = torch.ones((), device="cuda")
    for n, k in shapes:
        if time.time() - t0 > budget_s:
            print(f"mid_tune: budget, skipped {n}x{k}", flush=True)
            continue
        sets = fp8_weight_sets(n, k, copies_for(n * k))
        Ws = [s["block"] for s in sets]
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(2 * n * k))]
        forms = _call_forms(n, k)
        calls, small_wins = {}, {}
        for m in MID_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xqt, _ = quantize_fp8(x, "tensor_dynamic")
            cur = pick_candidate(Ws[0], "token_group", m)
            cur_name = "small_m" if cur == "small_m" else "cb%d%s%s" % cublas_block_split(Ws[0], m)
            groups = {}
            if m <= 256:
                groups["small_m"] = [lambda W=W: fp8_linear(x, W, "token_group", candidate="small_m") for W in Ws]

            def cb(W, form):
                xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
                return _cublas_block(xq, xs, W, None, torch.bfloat16, *form)

            for f in forms:
                groups["cb%d%s%s" % f] = [lambda W=W, f=f: cb(W, f) for W in Ws]
            t: dict = {}
            for _ in range(passes):
                timer = Interleaved(lambda fns: math.ceil(12 / len(fns)))
                timer.add("bf16", [lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
                timer.add("tensor_fp8", [lambda W=W: torch._scaled_mm(xqt, W.weight.t(), one, one,
                                                                      out_dtype=torch.bfloat16) for W in Ws])
                for name, fns in groups.items():
                    timer.add(name, fns)
                for name, us in timer.run().items():
                    t.setdefault(name, []).append(us or float("inf"))
            mean = {v: sum(ts) / len(ts) for v, ts in t.items()}
            cands = [v for v in groups if v in mean]
            best = min(cands, key=lambda v: mean[v])
            if best != cur_name and cur_name in t and not all(a < 0.97 * c for a, c in zip(t[best], t[cur_name])):
                best = cur_name  # not a clear win: the current choice stays
            best_cb = min((v for v in cands if v != "small_m"), key=lambda v: mean[v])
            if best.startswith("cb"):
                best_cb = best
            calls[m] = next(list(f) for f in forms if "cb%d%s%s" % f == best_cb)
            small_wins[m] = best == "small_m"
            res.setdefault(f"{n}x{k}", {})[str(m)] = {"us": t, "current": cur_name, "choice": best}
            print(f"  {n}x{k} M={m}: current {cur_name} {mean.get(cur_name, 0):.1f} -> {best} {mean[best]:.1f} us "
                  f"(bf16 {mean['bf16']:.1f}, tensor fp8 {mean['tensor_fp8']:.1f}) | "
                  + " ".join(f"{v}:{mean[v]:.1f}" for v in cands), flush=True)
        small_max = 15
        for m in MID_MS:
            if small_wins.get(m):
                small_max = m
            else:
                break
        select[f"{n}x{k}"] = {"cublas_block_calls": {str(m): c for m, c in calls.items()},
                              "small_m_max": small_max, "cublas_block_min_m": small_max + 1}
        print(f"  {n}x{k}: {select[f'{n}x{k}']}", flush=True)
        del sets, Ws, bf16
        torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name()

    def upd_select(cfg):
        shapes_cfg = cfg.setdefault("block", {}).setdefault("shapes", {})
        for key, entry in select.items():
            shapes_cfg[key] = {**shapes_cfg.get(key, {}), **entry}
        cfg["_mid_source"] = (
            f"bench/kernels/fp8_tune.py mid_tune on {dev}, {time.strftime('%Y-%m-%d')}: M = 16..1024 end to end from "
            "bf16 x, small_m vs quantize_fp8 + cuBLAS block-wise in every (split_k, split_n, rows) form, "
            f"interleaved CUDA-graph replay over rotated weight copies, {passes} rounds; a change kept where >= 3% "
            "faster in every round (fp8_mid_tune.json)")

    return _save_select("mid_tune", out_dir, select, upd_select, res, dev, t0)


# ---- small_m configs for per-tensor / per-channel weights at decode (fp8_small_m.json "row_scale") -----------------

ROW_CONFIGS = [(bn, s, 4, st, 64) for bn in (64, 128) for s in (1, 2, 4, 8) for st in (3, 5)]


def row_tune(out_dir: str, budget_s: float = 240, shapes=None, ms=(1, 16)) -> dict:
    """small_m launch configs for weights with one scale per tensor or per row, at M = 1 / 16. The main table was
    tuned on block weights (per-K-block scales, token_group x quantized in-kernel); here each candidate of ROW_CONFIGS
    and the main table's config run the two forms the selection runs for these weights at decode, per-tensor weights
    with static x (A_STATIC) and per-channel weights with per-token x (A_DYN_TOKEN, or quantize_fp8 first where
    fp8_gemm.fuses_quant says so), interleaved. A config is kept where the sum of the two is >= 3% below the main
    table's. Writes fp8_small_m.json "row_scale" {"NxK": {"<M>": config}} and <out_dir>/fp8_row_tune.json."""
    from lowbit.kernels import fp8_small_m as sm
    from lowbit.kernels.fp8_gemm import fuses_quant, small_m_config
    from lowbit.kernels.quant_act import quantize_fp8

    t0 = time.time()
    res: dict = {}
    chosen: dict = {}
    for n, k in shapes or SWEEP_SHAPES:
        if time.time() - t0 > budget_s:
            print(f"row_tune: budget, skipped {n}x{k}", flush=True)
            continue
        sets = fp8_weight_sets(n, k, copies_for(n * k))
        static = torch.tensor([0.02], device="cuda")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            token_fused = fuses_quant(sets[0]["channel"], "token", m)
            xq, xs = quantize_fp8(x, "token")

            def forms(c):
                st = [lambda W=s_["tensor"]: sm.fp8_small_m(x, static, sm.A_STATIC, W.weight, W.row_scale, None,
                                                           W.counters, n, k, config=c) for s_ in sets]
                if token_fused:
                    tok = [lambda W=s_["channel"]: sm.fp8_small_m(x, None, sm.A_DYN_TOKEN, W.weight, W.row_scale, None,
                                                                 W.counters, n, k, config=c) for s_ in sets]
                else:
                    tok = [lambda W=s_["channel"]: sm.fp8_small_m(xq, xs, sm.A_FP8_ROW, W.weight, W.row_scale, None,
                                                                 W.counters, n, k, config=c) for s_ in sets]
                return st, tok

            table = tuple(small_m_config(n, k, m))  # with its PDL flag where the main table has one
            cands = [table] + [c for c in ROW_CONFIGS if c != table[:5] and c[1] <= math.ceil(k / 128)]
            t = fp8_bench.timer()
            for c in cands:
                st, tok = forms(c)
                t.add(f"static|{c}", st)
                t.add(f"token|{c}", tok)
            r = t.run()
            sums = {c: r[f"static|{c}"] + r[f"token|{c}"] for c in cands
                    if r.get(f"static|{c}") and r.get(f"token|{c}")}
            best = min(sums, key=sums.get) if sums else table
            keep = table in sums and best != table and sums[best] < 0.97 * sums[table]
            if keep:
                chosen.setdefault(f"{n}x{k}", {})[str(m)] = list(best)
            us = {f"{f}|{list(c)}": r.get(f"{f}|{c}") for c in cands for f in ("static", "token")}
            res[f"{n}x{k}:{m}"] = {"table": list(table), "best": list(best), "kept": keep, "us": us}
            print(f"  {n}x{k} M={m}: table {table} {sums.get(table, 0):.2f} us (static + token), best {best} "
                  f"{sums.get(best, 0):.2f} -> {'kept' if keep else 'table'}", flush=True)
        sets = None
        torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name()

    def upd(cfg):
        rows = cfg.setdefault("row_scale", {})
        for key, entry in chosen.items():  # buckets up to the largest tuned M; the main table above it
            rows[key] = {b: entry.get(b) or list(small_m_config(*map(int, key.split("x")), int(b)))
                         for b in map(str, ms)}
        cfg["_row_scale_source"] = (
            f"bench/kernels/fp8_tune.py row_tune on {dev}, {time.strftime('%Y-%m-%d')}: per-tensor / per-channel "
            "weights at M = 1 / 16 (static x and per-token x summed), the main table's config vs 16 others, "
            "interleaved CUDA-graph replay over rotated weight copies; kept where >= 3% faster (fp8_row_tune.json)")

    if chosen:
        _write_config("fp8_small_m", upd)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fp8_row_tune.json"), "w") as f:
        json.dump({"rows": res, "chosen": chosen, "device": dev, "seconds": time.time() - t0}, f, indent=1)
    print(f"row_tune: {time.time() - t0:.0f} s", flush=True)
    return chosen


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.kernels.fp8_tune")
    parser.add_argument("what", choices=["sweep", "retime", "warm_bench", "split_tune", "rows_tune", "mid_tune",
                                         "row_tune"])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--budget", type=float, default=140)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--old", default=None, help="sweep: the committed fp8_small_m.py, timed at its configs")
    parser.add_argument("--prev", default=None, help="retime: fp8_sweep.json of a split_k_sweep run")
    parser.add_argument("--config", default=None, help="retime: write the winners here (fp8_small_m.json)")
    parser.add_argument("--wait-for", default=None, help="start timing once this file exists")
    parser.add_argument("--confirm", action="store_true", help="rows_tune: keep configured ranges that win again")
    a = parser.parse_args()
    if a.what == "sweep":
        split_k_sweep(a.out, a.budget, a.workers, old_module=a.old, wait_for=a.wait_for)
    elif a.what == "split_tune":
        split_tune(a.out, a.budget)
    elif a.what == "rows_tune":
        rows_tune(a.out, a.budget, confirm=a.confirm)
    elif a.what == "mid_tune":
        mid_tune(a.out, a.budget)
    elif a.what == "row_tune":
        row_tune(a.out, a.budget)
    elif a.what == "retime":
        retime(a.prev, a.out, a.config, a.budget, a.workers, wait_for=a.wait_for)
    else:
        warm_bench(a.workers)
