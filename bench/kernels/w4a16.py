"""w4a16 sweep: lowbit's int4 group-128 GEMM vs cuBLAS bf16 and torch's int4 tinygemm, on real layer shapes.

    python -m bench.kernels w4a16 [--quick] [--out DIR]          the benchmark (results section "w4a16_gemm")
    python -m bench.kernels.w4a16 --tune [--out DIR]             writes lowbit/kernels/configs/w4a16_<gpu>.json
    python -m bench.kernels.w4a16 --tune --shapes 2112x7168,...  tunes those shapes into the checked-in table

Times are CUDA-graph replays of several calls, each on its own copy of the weights (>= 160 MB of distinct
bytes, > 3x the L2 of an H100), so small-M numbers are HBM numbers, not L2 hits and not launch gaps; lowbit's
graph and its peers' are replayed in turn (bench.common.Interleaved), so each ratio compares the same clocks.
Columns: us (lowbit), GBps / pct_hbm (int4 weights + scales + x + y, each once, over the copy bandwidth
measured in this run), TFLOPs, bf16_us (torch.matmul, cuBLAS), int4pack_us (torch._weight_int4pack_mm),
x_bf16 = bf16_us / us (>= 1: not slower than cuBLAS), path (the config the table picked).
int4pack is timed for M <= 256 only (at M=4096 it measured 16-60x slower than cuBLAS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from bench.common import (Interleaved, copies_for, gpu_name, graph_replay_us, parse_shapes, print_table, rooflines,
                          save_section)

SHAPES = {  # per model: qkv (fused), o, gate (= up), down as (N, K)
    "llama3-8b": [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)],
    "llama3-70b": [(10240, 8192), (8192, 8192), (28672, 8192), (8192, 28672)],
    "qwen2.5-7b": [(4608, 3584), (3584, 3584), (18944, 3584), (3584, 18944)],
    "qwen3-32b": [(10240, 5120), (5120, 8192), (25600, 5120), (5120, 25600)],
}
M_ALL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192]
M_QUICK = [1, 16, 256, 4096]
QUICK_SHAPES = [(8192, 28672), (28672, 8192), (4096, 14336)]
TUNE_M = [1, 16, 32, 64, 128, 256, 512, 1024, 4096]  # buckets in between take the nearest tuned one
GROUP = 128
INT4PACK_MAX_M = 256  # tinygemm is a decode kernel: 16 to 60x slower than cuBLAS at M=4096, not worth timing
def budget_rounds(fns: list, budget_ms: float = 4.0) -> int:
    """Round-robin rounds of `fns` that make a CUDA graph of about `budget_ms` (one timed eager pass estimates it)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3 / len(fns)
    return max(1, min(64, math.ceil(budget_ms / max(est_ms, 1e-3) / len(fns))))


def graph_us(fns: list, budget_ms: float = 4.0, reps: int = 5) -> float:
    """Median per-call microseconds of `fns` replayed round-robin from one CUDA graph of about `budget_ms`."""
    return graph_replay_us(fns, budget_rounds(fns, budget_ms), reps)


def safe_us(fns, **kw) -> float | None:
    try:
        return graph_us(fns, **kw)
    except Exception as exc:  # noqa: BLE001 - a peer or config that cannot run this shape is recorded as missing
        print(f"    skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        torch.cuda.synchronize()
        return None


def weight_sets(n, k, count, dtype):
    """count repacked copies of one random int4 g128 symmetric weight, plus its canonical scales."""
    from lowbit.kernels.reference import pack_int32
    from lowbit.kernels.w4a16 import w4a16_repack

    scales = (torch.rand(n, math.ceil(k / GROUP), device="cuda") * 1e-2 + 1e-3).to(dtype).float()
    out = []
    for _ in range(count):
        q = pack_int32(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32), 4)
        out.append(w4a16_repack(q, scales, None, None, 4, GROUP, k))
    return out


def int4pack_peer(n, k, count):
    """torch._weight_int4pack_mm operands (tinygemm, bf16 only), or None where this build lacks it."""
    try:
        sz = torch.zeros(math.ceil(k / GROUP), n, 2, device="cuda", dtype=torch.bfloat16)
        sz[..., 0] = 1e-2
        packs = [torch._convert_weight_to_int4pack(torch.randint(0, 256, (n, k // 2), device="cuda",
                                                                 dtype=torch.uint8), 8) for _ in range(count)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, packs[0], GROUP, sz)
        return packs, sz
    except Exception as exc:  # noqa: BLE001
        print(f"  int4pack peer unavailable for {n}x{k}: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def warm_up(ws, k, dtype) -> None:
    """One discarded timing per shape: the first after the CPU-side setup (weights, compiles) ran ~10% slow
    whatever the kernel or M (clocks ramping up from idle), which is no property of the GEMM."""
    from lowbit.kernels.w4a16 import w4a16_gemm

    x = torch.randn(16, k, device="cuda", dtype=dtype)
    graph_us([lambda w=w: w4a16_gemm(x, w) for w in ws], budget_ms=20.0, reps=2)


def bench_shape(n, k, ms, roof, name, dtype=torch.bfloat16):
    from lowbit.kernels.w4a16 import w4a16_gemm
    from lowbit.kernels.w4a16_tune import select_config

    nbytes_w = n * k // 2 + n * math.ceil(k / GROUP) * 2
    ws = weight_sets(n, k, copies_for(nbytes_w), dtype)
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(2 * n * k))]
    peer = int4pack_peer(n, k, copies_for(n * k // 2))
    rows = []
    warm_up(ws, k, dtype)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        cfg = select_config(ws[0], m, dtype, x.device)
        r = {"shape": name, "N": n, "K": k, "M": m, "path": _describe(cfg)}
        t = Interleaved(budget_rounds)  # lowbit and its peers replayed in turn: the same clocks for all
        t.add("us", [lambda w=w: w4a16_gemm(x, w) for w in ws])
        t.add("bf16_us", [lambda w=w: torch.matmul(x, w.t()) for w in dense])
        if peer and dtype == torch.bfloat16 and m <= INT4PACK_MAX_M:
            t.add("int4pack_us", [lambda p=p, sz=peer[1]: torch._weight_int4pack_mm(x, p, GROUP, sz) for p in peer[0]])
        r.update(t.run())
        if r["us"]:
            nbytes = nbytes_w + 2 * m * k + 2 * m * n
            r["GBps"] = nbytes / r["us"] / 1e3
            r["pct_hbm"] = 100 * r["GBps"] / roof["copy_GBps"]
            r["roof_us"] = nbytes / roof["copy_GBps"] / 1e3
            r["TFLOPs"] = 2.0 * m * n * k / r["us"] / 1e6
            r["x_bf16"] = r["bf16_us"] / r["us"] if r["bf16_us"] else None
        rows.append(r)
        print(f"  {name} M={m}: {r['us']} us ({r.get('pct_hbm') or 0:.0f}% HBM, {r.get('TFLOPs') or 0:.0f} TFLOP/s) "
              f"bf16 {r['bf16_us']} int4pack {r.get('int4pack_us')} [{r['path']}]", flush=True)
    del ws, dense, peer
    torch.cuda.empty_cache()
    return rows


def _describe(cfg: dict) -> str:
    if cfg["path"] == "wgmma":
        mode = "rs" if cfg.get("RS") else "ss"
        split = (f"/s{cfg['SPLIT_K']}" if cfg.get("SPLIT_K", 1) > 1 else "/tail" if cfg.get("TAIL_SPLIT")
                 else "/streamk" if cfg.get("STREAM_K") else "")
        return f"wgmma-{mode}/{cfg['BLOCK_N']}x{cfg['BLOCK_M']}/st{cfg.get('num_stages', 3)}{split}"
    if cfg["path"] == "tma":
        return f"tma/{cfg['BLOCK_N']}x{cfg['BLOCK_M']}/w{cfg.get('num_warps', 8)}st{cfg.get('num_stages', 3)}"
    if cfg["path"] == "dequant" and cfg.get("chunks", 1) > 1:
        return f"dequant/ch{cfg['chunks']}" + ("/overlap" if cfg.get("overlap") else "")
    if cfg["path"] != "fused":
        return cfg["path"]
    mode = "after" if cfg.get("SCALE_AFTER", True) else "pre"
    return (f"{cfg['BLOCK_N']}x{cfg['BLOCK_M']}/s{cfg.get('SPLIT_K', 1)}/{mode}/"
            f"w{cfg.get('num_warps', 4)}st{cfg.get('num_stages', 3)}")


COLUMNS = ["shape", "N", "K", "M", "us", "roof_us", "GBps", "pct_hbm", "TFLOPs", "bf16_us", "x_bf16", "int4pack_us",
           "path"]


def main(args) -> None:
    roof = rooflines()
    print(f"rooflines: {roof}")
    dtype = torch.bfloat16
    ms = [int(v) for v in args.ms.split(",")] if getattr(args, "ms", None) else M_QUICK if args.quick else M_ALL
    rows = []
    payload = {"rooflines": roof, "rows": rows, "quick": bool(args.quick), "dtype": str(dtype), "group_size": GROUP,
               "timing": "CUDA graph replay, weights rotated over >= 160 MB; bytes = int4 weights + scales + x + y"}
    for family, shapes in SHAPES.items():
        for n, k in shapes:
            if args.quick and (n, k) not in QUICK_SHAPES:
                continue
            rows += bench_shape(n, k, ms, roof, f"{family}:{n}x{k}", dtype)
            save_section("w4a16_gemm", dict(payload, partial=True), args.out)  # a cut-short run keeps its rows
    print_table(rows, COLUMNS)
    print("saved", save_section("w4a16_gemm", payload, args.out))
    _plot(rows, roof, args.out)


def _plot(rows, roof, out_dir) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape and r.get("us")]
        a.plot([r["M"] for r in rs], [r["pct_hbm"] for r in rs], marker="o", label=shape)
        b.plot([r["M"] for r in rs], [r["x_bf16"] or 0 for r in rs], marker="o", label=shape)
    a.set(xscale="log", xlabel="M", ylabel="% of HBM copy roofline", title=f"w4a16 ({roof['copy_GBps']:.0f} GB/s copy)")
    b.set(xscale="log", xlabel="M", ylabel="cuBLAS bf16 time / w4a16 time", title="speed-up over cuBLAS bf16")
    b.axhline(1.0, color="k", lw=0.8)
    a.legend(fontsize=6)
    path = os.path.join(out_dir or os.path.join(os.path.dirname(__file__), "..", "results"), f"w4a16_{gpu_name()}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print("plot", path)


def tune(out_dir: str | None = None, quick: bool = False, time_limit_s: float = 1e9,
         shapes: list[tuple[int, int]] | None = None) -> str:
    """Time every candidate per (shape, M) with graph replays; write the table the GEMM looks up. shapes: tune only
    these (N, K) and merge them into the checked-in table (its other shapes and its note kept)."""
    from lowbit.kernels.w4a16 import w4a16_gemm
    from lowbit.kernels.w4a16_tune import CONFIG_DIR, candidates, shape_key

    t_start = time.time()
    dtype = torch.bfloat16
    table = {}
    every = [nk for shapes in SHAPES.values() for nk in shapes]
    order = QUICK_SHAPES + ([] if quick else [nk for nk in every if nk not in QUICK_SHAPES])  # targets first
    base = {}
    if shapes:
        order = shapes
        with open(os.path.join(CONFIG_DIR, f"w4a16_{gpu_name()}.json")) as f:
            base = json.load(f)
        table = base.get("configs", {})
    for n, k in order:
        if time.time() - t_start > time_limit_s:
            print(f"time limit: {n}x{k} and later shapes untuned (the heuristic serves them)")
            break
        ws = weight_sets(n, k, copies_for(n * k // 2), dtype)
        per_m = table.setdefault(shape_key(ws[0]), {})
        warm_up(ws, k, dtype)
        for m in TUNE_M:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            timed = []
            for cfg in candidates(ws[0], m, x.device):
                us = safe_us([lambda w=w, c=cfg: w4a16_gemm(x, w, config=c) for w in ws], budget_ms=2.0, reps=3)
                if us:
                    timed.append((us, cfg))
            if timed:
                us, best = min(timed, key=lambda t: t[0])
                per_m[str(m)] = dict(best, us=round(us, 2))
                print(f"tune {n}x{k} M={m}: {_describe(best)} {us:.1f} us "
                      f"(of {len(timed)}; worst {max(t[0] for t in timed):.1f})", flush=True)
        del ws
        torch.cuda.empty_cache()
    path = os.path.join(out_dir or CONFIG_DIR, f"w4a16_{gpu_name()}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        added = f"; {time.strftime('%Y-%m-%d')}: {', '.join(f'{n}x{k}' for n, k in shapes)} tuned by " \
            "python -m bench.kernels.w4a16 --tune --shapes (every candidate, fastest per bucket)" if shapes else ""
        json.dump(dict(base, device=torch.cuda.get_device_name(), dtype=str(dtype), tuned_on=f"int4 g{GROUP} sym",
                       configs=table, **({"note": base.get("note", "") + added} if shapes else {})),
                  f, indent=1, sort_keys=True)
    print("wrote", path, f"in {time.time() - t_start:.0f} s")
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.kernels.w4a16")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--time-limit", type=float, default=1e9)
    p.add_argument("--shapes", default=None, help="with --tune: NxK,... tuned and merged into the checked-in table")
    a = p.parse_args()
    tune(a.out, a.quick, a.time_limit, parse_shapes(a.shapes)) if a.tune else main(a)
