"""w4a8 sweep: int4 group-128 weights x fp8 activations vs cuBLAS bf16, lowbit w4a16 and cuBLAS fp8 (tensor-wise).

Timing as in bench/kernels/fp8.py (CUDA-graph replays over rotated weight copies). Columns:
  us / e2e    w4a8_linear from bf16 x with token_group 128 (DeepSeek W4AFP8) activations, quantization included
  static_us   the same with a static per-tensor scale (W4A8-AWQ)
  w4a16_us    lowbit's w4a16 on the same int4 weights (when lowbit/kernels/w4a16.py is importable)
  bf16_us, cublas_fp8_us   the peers;  x_bf16 = bf16_us / us;  x_w4a16 = w4a16_us / us (>= 1: as fast)
  triton_us / dequant_us / dequant_cublas_us / small_m_us   candidates forced, for the selection table
"""

from __future__ import annotations

import math

import torch

from bench.common import print_table, rooflines, save_section
from bench.kernels.fp8 import M_ALL, M_QUICK, QUICK_SHAPES, SHAPES, copies_for, safe_us


def _w4a16():
    """lowbit's w4a16 (another module, still moving): (repack, gemm) or None, never an import error."""
    try:
        from lowbit.kernels import w4a16

        return w4a16.w4a16_repack, w4a16.w4a16_gemm
    except Exception as exc:  # noqa: BLE001 - absent or broken: the column stays empty
        print(f"w4a16 peer unavailable: {type(exc).__name__}: {exc}")
        return None


def bench_shape(n, k, ms, roof, name, peer_w4a16, dtype=torch.bfloat16):
    from lowbit.kernels.quant_act import quantize_fp8
    from lowbit.kernels.reference import pack_int32
    from lowbit.kernels.w4a8 import pick_candidate, w4a8_linear, w4a8_repack

    count = copies_for(n * k // 2)
    qws = [pack_int32(torch.randint(0, 16, (n, k), device="cuda"), 4) for _ in range(count)]
    scales = torch.rand(n, math.ceil(k / 128), device="cuda", dtype=dtype) * 1e-2 + 1e-3
    ws = [w4a8_repack(q, scales, 128, k) for q in qws]
    w16 = None
    if peer_w4a16:
        try:
            w16 = [peer_w4a16[0](q, scales, None, None, 4, 128, k) for q in qws]
        except Exception as exc:  # noqa: BLE001
            print(f"  w4a16 repack failed: {type(exc).__name__}: {exc}")
    del qws
    bf16 = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(2 * n * k))]
    w8 = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies_for(n * k))]
    one = torch.ones((), device="cuda")
    static = torch.tensor([0.02], device="cuda")
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        xqt, _ = quantize_fp8(x, "tensor_dynamic")
        r = {"shape": name, "N": n, "K": k, "M": m, "cand": pick_candidate(ws[0], m)}
        r["bf16_us"] = safe_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
        r["cublas_fp8_us"] = safe_us([lambda w=w: torch._scaled_mm(xqt, w.t(), one, one, out_dtype=dtype) for w in w8])
        r["us"] = safe_us([lambda w=w: w4a8_linear(x, w, "token_group") for w in ws])
        r["static_us"] = safe_us([lambda w=w: w4a8_linear(x, w, "tensor_static", static) for w in ws])
        if w16:
            r["w4a16_us"] = safe_us([lambda w=w: peer_w4a16[1](x, w) for w in w16])
        forced_all = (["triton", "dequant"] if m > 16 else []) + (["small_m"] if 16 < m <= 64 else [])
        for forced in forced_all + (["dequant_cublas"] if m >= 16 and k % 128 == 0 else []):
            r[f"{forced}_us"] = safe_us([lambda w=w, c=forced: w4a8_linear(x, w, "token_group", candidate=c)
                                         for w in ws])
        if r["us"]:
            nbytes = n * k // 2 + n * math.ceil(k / 128) * 4 + 2 * m * k + 2 * m * n
            r["TFLOPs"] = 2.0 * m * n * k / r["us"] / 1e6
            r["GBps"] = nbytes / r["us"] / 1e3
            r["pct_hbm"] = 100 * r["GBps"] / roof["copy_GBps"]
            r["x_bf16"] = r["bf16_us"] / r["us"] if r["bf16_us"] else None
            r["x_w4a16"] = r["w4a16_us"] / r["us"] if r.get("w4a16_us") else None
        rows.append(r)
        print(f"  {name} M={m}: {r['cand']} {r['us']} us, static {r['static_us']} us, w4a16 {r.get('w4a16_us')} us, "
              f"bf16 {r['bf16_us']} us, fp8 cuBLAS {r['cublas_fp8_us']} us", flush=True)
    del ws, w16, bf16, w8
    torch.cuda.empty_cache()
    return rows


COLUMNS = ["shape", "N", "K", "M", "cand", "us", "TFLOPs", "GBps", "pct_hbm", "static_us", "w4a16_us", "x_w4a16",
           "bf16_us", "x_bf16", "cublas_fp8_us", "triton_us", "dequant_us", "dequant_cublas_us", "small_m_us"]


def main(args) -> None:
    roof = rooflines()
    print(f"rooflines: {roof}")
    peer = _w4a16()
    ms = M_QUICK if args.quick else M_ALL
    rows = []
    for family, shapes in SHAPES.items():
        for n, k in shapes:
            if args.quick and (n, k) not in QUICK_SHAPES:
                continue
            rows += bench_shape(n, k, ms, roof, f"{family}:{n}x{k}", peer)
    print_table(rows, COLUMNS)
    payload = {"rooflines": roof, "rows": rows, "quick": bool(args.quick), "w4a16_peer": peer is not None,
               "timing": "CUDA graph replay, weights rotated over >= 160 MB; bf16 activations/outputs"}
    print("saved", save_section("w4a8_gemm", payload, args.out))
