"""w4a8 sweep: int4 group-128 weights x fp8 activations vs lowbit w4a16 (same int4 weights), cuBLAS bf16 and fp8.

Timing: CUDA-graph replays over rotated weight copies (bench/kernels/w4a16.py budget_rounds), one discarded warm-up
per shape; at each M the graphs of all candidates and peers are replayed in turn (bench.common.Interleaved). Columns:
  us             w4a8_linear from bf16 x, token_group 128 activations (DeepSeek W4AFP8), quantization included
  static_us      the same with a static per-tensor scale (W4A8-AWQ)
  w4a16_us       lowbit's w4a16_gemm on the same weights (bf16 x), in the same run
  x_w4a16 / x_w4a16_static = w4a16_us / us / static_us   (>= 1: w4a8 as fast as w4a16)
  exact_us       static with the in-kernel x / s correctly rounded (config exact=True; the default multiplies by
                 RN(1 / s)), M = 1, 16
  wide_us / wide_static_us   token_group / static on 128-row weight tiles (fp8act_config block_n=128), M = 4..32
  rowskip_static_us  static quantizing only the token row of the 16-row tile at M = 1 (row_pad=True)
  fused_us / dequant_cublas_us   candidates forced where the selection switches (M > 16), for w4a8_select.json
  dequant_us / dequant_cublas_us   the large-M candidates forced (M >= 128)
  dequant_cublas_static_us / dequant_cublas_x128_static_us   static through cuBLAS, x's scale as 1 x 128 blocks /
                 as a constant 128x128 grid, forced (M >= 33)
  pre_us / pre_static_us   token_group / static with x quantized first (candidate fused_pre), M <= 64
  w16_us / w16_static_us   token_group / static, x fake-quantized then lowbit's w4a16 GEMM (candidate w16)
  gemm_us / gemm_static_us   M >= 128: token_group / static with x quantized by its producer (the fused add +
                 RMSNorm + quantize of kernels/norm.py in the models): w4a8_linear on e4m3 x (prequantized_candidate),
                 or where the selection picks w16, lowbit's w4a16 GEMM on the (fake-quantized) bf16 x
  x_bf16_gemm / x_bf16_gemm_static = bf16_us / gemm_us / gemm_static_us
  bf16_us, cublas_fp8_us         peers (torch.nn.functional.linear; torch._scaled_mm tensor-wise)
"""

from __future__ import annotations

import math
import time

import torch

from bench.common import Interleaved, parse_shapes, print_table, rooflines, save_section
from bench.kernels.fp8_tune import _write_config, longest_run
from bench.kernels.w4a16 import budget_rounds, copies_for, safe_us

SHAPES = {  # (N, K): DeepSeek-V3 (as bench/kernels/fp8.py), Llama-3-8B and Qwen3-32B projections
    "dsv3": [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)],
    "llama3-8b": [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)],
    "qwen3-32b": [(10240, 5120), (5120, 8192), (51200, 5120), (5120, 25600)],
}
QUICK_SHAPES = [(4096, 7168), (7168, 16384), (2112, 7168), (4096, 14336)]  # in this order
M_ALL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
M_QUICK = [1, 2, 4, 8, 16, 32, 64, 2048, 8192]


def bench_shape(n, k, ms, roof, name, dtype=torch.bfloat16):
    from lowbit.kernels.quant_act import quantize_fp8
    from lowbit.kernels.reference import pack_int32
    from lowbit.kernels.w4a16 import w4a16_gemm
    from lowbit.kernels.w4a16_fp8act import fp8act_config, w4a16_gemm_fp8act
    from lowbit.kernels.w4a8 import fused_config, pick_candidate, w4a8_linear, w4a8_repack

    scales = torch.rand(n, math.ceil(k / 128), device="cuda", dtype=dtype) * 1e-2 + 1e-3
    ws = [w4a8_repack(pack_int32(torch.randint(0, 16, (n, k), device="cuda"), 4), scales, 128, k)
          for _ in range(copies_for(n * k // 2))]
    bf16 = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(2 * n * k))]
    w8 = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies_for(n * k))]
    one = torch.ones((), device="cuda")
    static = torch.tensor([0.02], device="cuda")
    x16 = torch.randn(16, k, device="cuda", dtype=dtype)
    safe_us([lambda w=w: w4a8_linear(x16, w, "tensor_static", static) for w in ws])  # warm-up, discarded
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        xqt, _ = quantize_fp8(x, "tensor_dynamic")
        r = {"shape": name, "N": n, "K": k, "M": m, "cand": pick_candidate(ws[0], m),
             "cand_static": pick_candidate(ws[0], m, "tensor_static")}
        if r["cand"] == "fused":
            c = fused_config(ws[0], m, x.device, "token_group")
            r["cfg"] = f"{c['BLOCK_N']}x{c['BLOCK_M']}/s{c.get('SPLIT_K', 1)}/w{c.get('num_warps', 4)}"
        t = Interleaved(budget_rounds)  # every candidate and peer replayed in turn: the same clocks for all
        t.add("us", [lambda w=w: w4a8_linear(x, w, "token_group") for w in ws])
        t.add("static_us", [lambda w=w: w4a8_linear(x, w, "tensor_static", static) for w in ws])
        t.add("w4a16_us", [lambda w=w: w4a16_gemm(x, w.w16) for w in ws])
        if m <= 64:  # x quantized first (quantize_fp8), then the fused kernel on e4m3 x: w4a8_select.json fused_pre
            t.add("pre_us", [lambda w=w: w4a8_linear(x, w, "token_group", candidate="fused_pre") for w in ws])
            t.add("pre_static_us", [lambda w=w: w4a8_linear(x, w, "tensor_static", static, candidate="fused_pre")
                                    for w in ws])
        # fake-quantized x + the w4a16 GEMM (w4a8_select.json w16)
        t.add("w16_us", [lambda w=w: w4a8_linear(x, w, "token_group", candidate="w16") for w in ws])
        t.add("w16_static_us", [lambda w=w: w4a8_linear(x, w, "tensor_static", static, candidate="w16") for w in ws])
        if m in (1, 16):
            exact = dict(fused_config(ws[0], m, x.device, "tensor_static"), exact=True)
            t.add("exact_us", [lambda w=w: w4a16_gemm_fp8act(x, w.w16, "static", static, config=exact)
                               for w in ws])
        if m == 1:  # only the token row of the 16-token tile quantized (row_pad), off by default
            skip = dict(fused_config(ws[0], m, x.device, "tensor_static"), row_pad=True)
            t.add("rowskip_static_us", [lambda w=w: w4a16_gemm_fp8act(x, w.w16, "static", static, config=skip)
                                        for w in ws])
        if m in (4, 8, 16, 32):  # 128-row weight tiles (fused_wide_min_m in w4a8_select.json)
            wide = dict(fp8act_config(ws[0].w16, m, x.device, 128), exact=False, row_pad=False)
            t.add("wide_us", [lambda w=w: w4a16_gemm_fp8act(x, w.w16, "token_group", config=wide) for w in ws])
            t.add("wide_static_us", [lambda w=w: w4a16_gemm_fp8act(x, w.w16, "static", static, config=wide)
                                     for w in ws])
        t.add("bf16_us", [lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
        t.add("cublas_fp8_us", [lambda w=w: torch._scaled_mm(xqt, w.t(), one, one, out_dtype=dtype) for w in w8])
        if m >= 33:  # static through cuBLAS with x's scale as 1 x 128 or as 128x128 blocks (w4a8_select.json x128)
            for forced in ("dequant_cublas", "dequant_cublas_x128"):
                t.add(f"{forced}_static_us", [lambda w=w, c=forced: w4a8_linear(x, w, "tensor_static", static,
                                                                                candidate=c) for w in ws])
        if m >= 128:  # the large-M candidates, token_group activations
            for forced in ("dequant", "dequant_cublas"):
                t.add(f"{forced}_us", [lambda w=w, c=forced: w4a8_linear(x, w, "token_group", candidate=c)
                                       for w in ws])
        if m >= 128:  # x quantized by its producer (norm / SiLU-mul fused), the GEMM alone
            for act, key, sc in (("token_group", "gemm_us", None), ("tensor_static", "gemm_static_us", static)):
                xq, xsc = quantize_fp8(x, act, sc, column_major_scales=act == "token_group")
                if pick_candidate(ws[0], m, act) == "w16":
                    t.add(key, [lambda w=w: w4a16_gemm(x, w.w16) for w in ws])
                else:
                    t.add(key, [lambda w=w, a=act, q=xq, s=xsc: w4a8_linear(q, w, a, out_dtype=dtype, x_scale=s)
                                for w in ws])
        if m <= 64:  # in-kernel quantization, timed at every small M: a range once given to another candidate
            # (w16, fused_pre) can then come back to it in `select`
            t.add("fused_us", [lambda w=w: w4a8_linear(x, w, "token_group", candidate="fused") for w in ws])
            t.add("fused_static_us", [lambda w=w: w4a8_linear(x, w, "tensor_static", static, candidate="fused")
                                      for w in ws])
        if 16 < m <= 64:
            t.add("dequant_cublas_us", [lambda w=w: w4a8_linear(x, w, "token_group", candidate="dequant_cublas")
                                        for w in ws])
        r.update(t.run())
        if r["us"]:
            nbytes = n * k // 2 + n * math.ceil(k / 128) * 2 + 2 * m * k + 2 * m * n
            r["GBps"] = nbytes / r["us"] / 1e3
            r["pct_hbm"] = 100 * r["GBps"] / roof["copy_GBps"]
            r["x_bf16"] = r["bf16_us"] / r["us"] if r["bf16_us"] else None
            r["x_w4a16"] = r["w4a16_us"] / r["us"] if r["w4a16_us"] else None
        for key, col in (("gemm_us", "x_bf16_gemm"), ("gemm_static_us", "x_bf16_gemm_static")):
            if r.get(key) and r["bf16_us"]:
                r[col] = r["bf16_us"] / r[key]
        if r["static_us"] and r["w4a16_us"]:
            r["x_w4a16_static"] = r["w4a16_us"] / r["static_us"]
        rows.append(r)
        print(f"  {name} M={m}: {r['cand']} {r.get('cfg', '')} token_group {r['us']} us, static {r['static_us']} us, "
              f"w4a16 {r['w4a16_us']} us, exact {r.get('exact_us')}, bf16 {r['bf16_us']}, fp8 cuBLAS "
              f"{r['cublas_fp8_us']}"
              f", wide {r.get('wide_us')} / {r.get('wide_static_us')}, row skip {r.get('rowskip_static_us')}, forced "
              f"fused {r.get('fused_us')} dequant_cublas {r.get('dequant_cublas_us')} dequant {r.get('dequant_us')} "
              f"pre {r.get('pre_us')} / static {r.get('pre_static_us')}, w16 {r.get('w16_us')} / static "
              f"{r.get('w16_static_us')}, static cuBLAS 1x128 / x128 {r.get('dequant_cublas_static_us')} / "
              f"{r.get('dequant_cublas_x128_static_us')}", flush=True)
    del ws, bf16, w8
    torch.cuda.empty_cache()
    return rows


COLUMNS = ["shape", "M", "cand", "cfg", "us", "static_us", "w4a16_us", "x_w4a16", "x_w4a16_static", "gemm_us",
           "gemm_static_us", "x_bf16_gemm", "x_bf16_gemm_static", "exact_us",
           "wide_us", "wide_static_us", "rowskip_static_us", "pct_hbm", "bf16_us", "x_bf16", "cublas_fp8_us",
           "fused_us", "fused_static_us", "dequant_cublas_us", "dequant_us", "pre_us", "pre_static_us", "w16_us",
           "w16_static_us", "dequant_cublas_static_us", "dequant_cublas_x128_static_us"]


def main(args) -> None:
    roof = rooflines()
    print(f"rooflines: {roof}")
    ms = [int(v) for v in args.ms.split(",")] if getattr(args, "ms", None) else M_QUICK if args.quick else M_ALL
    shapes = QUICK_SHAPES if args.quick else [s for v in SHAPES.values() for s in v]
    names = {s: f"{fam}:{s[0]}x{s[1]}" for fam, v in SHAPES.items() for s in v}
    rows = []
    payload = {"rooflines": roof, "rows": rows, "quick": bool(args.quick), "w4a16_peer": True,
               "timing": "CUDA graph replay, weights rotated over >= 160 MB; bf16 activations/outputs"}
    for n, k in shapes:
        rows += bench_shape(n, k, ms, roof, names[(n, k)])
        save_section("w4a8_gemm", dict(payload, partial=True), args.out)  # a cut-short run keeps its rows
    print_table(rows, COLUMNS)
    print("saved", save_section("w4a8_gemm", payload, args.out))


# ---- selection from a sweep (results become configs/w4a8_select.json w16 / fused_pre ranges) ------------------------

SELECT_MS = (1, 4, 16, 32, 64, 128, 256, 512, 1024)
# per activation granularity: the forced-candidate columns of bench_shape and the current selection's own column
_SELECT_COLS = {
    "token_group": ({"w16": "w16_us", "fused_pre": "pre_us", "fused": "fused_us", "dequant_cublas": "dequant_cublas_us",
                     "dequant": "dequant_us"}, "us", "cand"),
    "tensor_static": ({"w16": "w16_static_us", "fused_pre": "pre_static_us", "fused": "fused_static_us",
                       "dequant_cublas": "dequant_cublas_static_us",
                       "dequant_cublas_x128": "dequant_cublas_x128_static_us"}, "static_us", "cand_static"),
}


def choose(rows: list[dict], fused_max_m: int | None = None) -> dict:
    """{(N, K, granularity, table): [(M, candidate), ...]} from bench_shape rows: for table "w16" the fastest
    candidate at each M where it is >= 3% faster than the selection's own pick (else that pick stays); for table
    "fused_pre" the same among the candidates other than w16 (fused_pre is what pick_candidate falls back on where
    w16 cannot run: fp32 outputs, a pre_quant_scale of another dtype), against the fastest of them. The forced
    in-kernel "fused" competes only up to fused_max_m (w4a8_select.json's: beyond it pick_candidate never returns it,
    so a win there would hand that M to whatever comes next, not to fused)."""
    out = {}
    for r in rows:
        for act, (cols, own, cand_col) in _SELECT_COLS.items():
            timed = {c: r[col] for c, col in cols.items()
                     if r.get(col) and (c != "fused" or fused_max_m is None or r["M"] <= fused_max_m)}
            cur, cur_us = r[cand_col], r.get(own)
            if cur_us:
                timed.setdefault(cur, cur_us)  # the selection's own pick (e.g. in-kernel fused) competes too
            best = min(timed, key=timed.get)
            keep = cur_us and not timed[best] < 0.97 * cur_us
            out.setdefault((r["N"], r["K"], act, "w16"), []).append((r["M"], cur if keep else best))
            rest = {c: t for c, t in timed.items() if c != "w16"}
            if rest:
                alt = min(rest, key=rest.get)
                second = min((t for c, t in rest.items() if c != alt), default=float("inf"))
                pick = alt if alt != "fused_pre" or rest[alt] < 0.97 * second else "other"
                out.setdefault((r["N"], r["K"], act, "fused_pre"), []).append((r["M"], pick))
    return out


def select_ranges(choice: dict, old: dict) -> dict:
    """{("w16" | "fused_pre", "NxK", granularity): [lo, hi] or None} from choose()'s picks: per shape and granularity
    the longest run of measured M where that candidate was picked; a configured lower bound (old: the selection
    before) between the run's first M and the M measured before it stays (e.g. 17 where 16 and 32 were measured);
    where the M measured before the run went to the in-kernel fused, the run starts right after old["fused_max_m"]
    (above it pick_candidate never returns fused, and the M in between would fall to dequant_cublas, which no
    measurement picked there); fused_pre only up to M = 64 (a decode kernel); w16 None means never (rather than
    w16_default)."""
    out = {}
    fused_max_m = old.get("fused_max_m")
    for (n, k, act, key), picks in choice.items():
        rng = longest_run(picks, key)
        prev = old[key].get(f"{n}x{k}", {}).get(act) or (old["w16_default"] if key == "w16" else None)
        before, before_pick = max([(m, p) for m, p in picks if rng and m < rng[0]], default=(0, None))
        if rng and prev and before < prev[0] < rng[0]:
            rng[0] = prev[0]
        if rng and before_pick == "fused" and fused_max_m is not None and before <= fused_max_m < rng[0] - 1:
            rng[0] = fused_max_m + 1
        if rng and key == "fused_pre" and rng[0] > 64:
            rng = None
        out[(key, f"{n}x{k}", act)] = rng
    return out


def write_select(choice: dict, old: dict, ms, device: str) -> None:
    """select_ranges(choice, old) into configs/w4a8_select.json (fused_pre entries without a range removed)."""
    def upd(cfg):
        for (key, shape, act), rng in select_ranges(choice, old).items():
            entry = cfg.setdefault(key, {}).setdefault(shape, {})
            if rng or key == "w16":
                entry[act] = rng
            else:
                entry.pop(act, None)
                if not entry:
                    cfg[key].pop(shape)
        cfg["_select_source"] = (
            f"python -m bench.kernels.w4a8 select on {device}, {time.strftime('%Y-%m-%d')}: every candidate timed "
            f"against the others at M = {', '.join(map(str, ms))} (interleaved CUDA-graph replay, bf16 x, quantization "
            "included); per shape and activation granularity the longest run of M where w16 was fastest and >= 3% "
            "faster than the selection before, and where fused_pre was >= 3% faster than every other candidate but "
            "w16 (bench/results w4a8_select)")

    _write_config("w4a8_select", upd)


def select(out_dir: str | None = None, ms=SELECT_MS, shapes=None) -> dict:
    """Per sweep shape and activation granularity (token_group, tensor_static), every candidate timed against the
    others at M = 1..1024 (bench_shape: one interleaved run per M, bf16 x, quantization included); choose() and
    write_select() turn the rows into configs/w4a8_select.json ranges. Before this, w16 ranges were measured on the
    four quick shapes only and the other ten took dequant_cublas from M = 129, whose cuBLAS 1x128 x 1x128 GEMM is
    slow at mid M (H100, w4a8_gemm_x128_sweep: 5120x25600 M = 512 392 us, w16 254 us, bf16 186). The rows go to the
    w4a8_select section of bench/results/<gpu>.json."""
    from lowbit.kernels.w4a8 import _select

    roof = rooflines()
    names = {s: f"{fam}:{s[0]}x{s[1]}" for fam, v in SHAPES.items() for s in v}
    rows = []
    for n, k in shapes or [s for v in SHAPES.values() for s in v]:
        rows += bench_shape(n, k, list(ms), roof, names[(n, k)])
    choice = choose(rows, _select()["fused_max_m"])
    for key, picks in choice.items():
        print(f"  {key}: {picks}", flush=True)
    write_select(choice, _select(), ms, torch.cuda.get_device_name())
    payload = {"rooflines": roof, "rows": rows, "ms": list(ms),
               "choice": {"%dx%d:%s:%s" % key: p for key, p in choice.items()}}
    print("saved", save_section("w4a8_select", payload, out_dir))
    return choice


# ---- decode layers: what a model runs at M = 1..16, w4a8 against w4a16 on the same int4 weights --------------------

DECODE_MS = (1, 2, 4, 8, 16)
DECODE_KINDS = ("w4a16", "w4a8", "w4a8_tg")  # bench/kernels/act_quant.py _layer kinds
DECODE_OPS = ("norm_linear", "silu_down", "linear")


def decode_layers(out_dir: str | None = None, ms=DECODE_MS, shapes=None, dtype=torch.bfloat16) -> list[dict]:
    """w4a8 (static per-tensor and token_group 128 activations) against w4a16 at decode sizes, as the models call the
    layers: norm_linear (add + RMSNorm, then the projection: qkv_proj, gate_up_proj), silu_down (gate | up [M, 2K],
    SiLU-mul, then the projection: down_proj) and linear (16-bit x straight in: o_proj). Each kind's Linear comes
    with its backend's repack (act_quant._layer), rotated over copies so the weights are read from HBM; the three
    kinds of one (op, M) are replayed interleaved. x_w4a16 = w4a16_us / us (>= 1: w4a8 as fast as w4a16)."""
    from bench.kernels.act_quant import _layer
    from lowbit.layers.activation import GatedAct, act_linear
    from lowbit.layers.norm import RMSNorm, norm_linear

    rows = []
    names = {s: f"{fam}:{s[0]}x{s[1]}" for fam, v in SHAPES.items() for s in v}
    for n, k in shapes or QUICK_SHAPES:
        layers = {kind: [_layer(kind, k, n, dtype) for _ in range(copies_for(n * k // 2))] for kind in DECODE_KINDS}
        norm = RMSNorm(k, 1e-6, dtype=dtype).cuda()
        silu = GatedAct("silu")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            r = torch.randn(m, k, device="cuda", dtype=dtype)
            h = torch.randn(m, 2 * k, device="cuda", dtype=dtype)
            calls = {"norm_linear": lambda lay: norm_linear(norm, lay, x, r),
                     "silu_down": lambda lay: act_linear(silu, lay, h), "linear": lambda lay: lay(x)}
            for op in DECODE_OPS:
                t = Interleaved(budget_rounds)
                for kind in DECODE_KINDS:
                    t.add(kind, [lambda lay=lay, f=calls[op]: f(lay) for lay in layers[kind]])
                res = t.run()
                row = {"shape": names.get((n, k), f"{n}x{k}"), "N": n, "K": k, "M": m, "op": op,
                       "w4a16_us": res["w4a16"], "static_us": res["w4a8"], "us": res["w4a8_tg"]}
                for key, col in (("static_us", "x_w4a16_static"), ("us", "x_w4a16")):
                    row[col] = row["w4a16_us"] / row[key] if row[key] and row["w4a16_us"] else None
                rows.append(row)
                print(f"  {row['shape']} M={m} {op}: w4a16 {row['w4a16_us']} us, w4a8 static {row['static_us']} us "
                      f"({row['x_w4a16_static']}), token_group {row['us']} us ({row['x_w4a16']})", flush=True)
        del layers
        torch.cuda.empty_cache()
    print_table(rows, ["shape", "M", "op", "w4a16_us", "static_us", "us", "x_w4a16_static", "x_w4a16"])
    payload = {"rows": rows, "ms": list(ms), "timing": "CUDA graph replay, layers rotated over >= 160 MB; bf16"}
    print("saved", save_section("w4a8_decode_layers", payload, out_dir))
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.kernels.w4a8")
    parser.add_argument("what", choices=["select", "decode"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--ms", default=None, help="comma-separated M values (default 1, 4, 16, ..., 1024)")
    parser.add_argument("--shapes", default=None, help="NxK,... (default: every sweep shape; others keep their ranges)")
    a = parser.parse_args()
    if a.what == "decode":
        decode_layers(a.out, [int(v) for v in a.ms.split(",")] if a.ms else DECODE_MS, parse_shapes(a.shapes))
    else:
        select(a.out, [int(v) for v in a.ms.split(",")] if a.ms else SELECT_MS, parse_shapes(a.shapes))
