"""w8a8 fp8 linear layers: repack once at load, then per call quantize x and pick the GEMM by M.

y = dequant(xq) @ dequant(W)^T + bias, the math of reference.fp8_gemm_ref (fp32 accumulation).

(Over 500 lines on purpose: one concept, the fp8 linear - its repack, the measured selection tables of
configs/fp8_select.json and the cuBLAS call forms they name share Fp8Weights and one config loader that the tests
patch here; about 40 lines are the record of designs measured and not kept, next to the code they would replace.)

Canonical input (lowbit/scheme.py) -> what each candidate reads:
| weight granularity | canonical weight_scale              | Fp8Weights                                           |
|--------------------|-------------------------------------|------------------------------------------------------|
| tensor             | [S], one per fused shard            | row_scale [N] (exact per shard); tensor_scale [1] when all shards agree |
| channel            | [N] (or [N, 1])                     | row_scale [N]                                        |
| block (BN x 128)   | [sum_s ceil(N_s/BN), ceil(K/128)]   | grid (as given) + grid_rows [N] int32 (grid row of each weight row, per shard) |
weight stays e4m3 [N, K] row-major (cuBLAS reads weight.t(), the Triton kernels read rows).
Fused layers: pass `shard_sizes` (the N_s); block grids may restart at every shard, partial edge blocks
included. Static activation scales of fused shards must be max'ed by the caller into one input_scale.

Candidates (`pick_candidate` chooses by M from configs/fp8_select.json: defaults, then per weight granularity,
then per "NxK" shape under that granularity; measured by bench/kernels/fp8.py):
| name         | kernel                                             | serves                                     |
|--------------|----------------------------------------------------|--------------------------------------------|
| small_m      | fp8_small_m.py split-K; x quantized in-kernel up to fused_quant_max, by quantize_fp8 first above | M <= 256, every scheme |
| triton       | fp8_block.py (quantize_fp8 first)                  | every scheme (token_group needs G = 128)   |
| cublas       | torch._scaled_mm, tensor-wise or row-wise          | tensor/channel weights, non-group acts, N, K % 16 == 0 |
| cublas_block | F.scaled_mm BlockWise1x128 x BlockWise128x128      | 128x128 blocks aligned to the fused rows, token_group 128, M >= 16, K % 512 == 0 |
cublas_block may run as several cuBLAS calls on side streams (fork/join, captured by CUDA graphs as branches), per
shape and M from fp8_select.json: split_k (K pieces into fp32 partials, summed: few output tiles at small M) and
split_n (the rows past the last whole 128 beside the main call: 2112 = 16.5 x 128 rows leave a third wave at M = 2048;
those < 128 rows always in the rows form below, in which cuBLAS took half the time: 2112x7168 M = 2048 60.0 vs 68.1 us,
H100, the 2048 whole-block rows alone 48.1, per-tensor fp8 on all 2112 rows 48.2);
and rows: the same math as BlockWise1x128 x BlockWise1x128, each 128x128 block scale repeated on its 128 weight rows
([N, K/128] column-major, made once per weight), which cuBLAS runs with other kernels (H100, 2112x7168 at M = 2048:
61.4 vs 70.8 us; slower on 4096x7168 and 7168x16384), so it is chosen per shape and M range by measurement.
At M = 16..1024 the form (split_k, split_n, rows) and the small_m / cuBLAS crossover come from one joint measurement
per shape (bench/kernels/fp8_tune.py mid_tune, "cublas_block_calls"): split_tune and rows_tune had each chosen one
knob with the other fixed, which missed rows alone at small M (H100, end to end from bf16 x, 2112x7168: M = 128
14.4 vs 20.4 us, M = 256 16.9 vs 25.7 us; 4096x4096 M = 64 12.2 vs 16.1 us; bf16 cuBLAS 17.7 / 20.1 / 15.1 us).
Not used: the transposed call (W as cuBLAS's first operand with 128x128 scales, x^T with 1x128) writes y^T; alone
it was faster at M = 2048 on 7168x16384 (413 vs 457 us, H100), but with the copy back (yt.t().contiguous()) it was
slower on all 14 sweep shapes at M = 512..8192 (e.g. 7168x16384 M = 2048: 533 vs 375 us).
Not kept either (H100, 2026-11-26, fourth session): lowbit's own block-scaled Gluon GEMM for large M (the file
lowbit/kernels/fp8_wgmma.py of commit 416ce21, its GPU tests in tests/kernels/test_fp8_wgmma.py there: TMA ring, each
128-wide K-block's wgmma into a fresh fp32 partial promoted with sa * sb, tail split; variants wait-then-promote,
blocks in pairs with the first promoted while the second runs, and warp-specialized with a producer warp and two
free-running consumer warpgroups). It matched the reference (40 GPU tests) but reached 42-71% of per-tensor cuBLAS
fp8 over 9 shapes at M = 2048 / 8192, against 76-95% for cuBLAS block-wise in the same runs (bench/results/h100.json
fp8_wgmma_probe*); loading the scales a block ahead changed nothing. ncu of the warp-specialized variant (7168x16384,
M = 2048): the tensor pipe busy 46% of the elapsed cycles; of the warp stall cycles 43% at the consumer warpgroup's
named barriers (the lowering puts one before every mbarrier wait and one before every stage release) and 36% on the
scale loads from global memory (the loop-carried prefetch waits at the end of its iteration). DeepGEMM's kernels,
which reach per-tensor speed, also bring the scales in through shared memory (TMA) and use wider N tiles.
Not kept either (H100, cuBLASLt 13.1 through ctypes, fifth session; throwaway probe): choosing cuBLASLt's algorithm
ourselves. cublasLtMatmulAlgoGetHeuristic returns one algorithm for 1x128 x 128x128 scales and seven for 1x128 x
1x128; enumerating algo 66's configurations (tiles 64x64 / 64x128 / 128x64 / 64x256 / 128x128 / 256x64 / 64x192, cluster
shapes, custom options 0-7; 120-132 valid per problem, the 144x128 tile that per-tensor fp8 runs on is not among them)
found nothing faster than the heuristic's pick: 2112x7168 at M = 2048 62.5 vs 62.3 us (per-tensor 48.1), at M = 4096
115.4 vs 110.9, 7168x16384 at M = 2048 379.5 vs 372.2; and the 256x64 tiles the heuristic never picks returned wrong
results (max error 12.5 against the reference). Per-tensor fp8 runs nvjet 144x128 tiles there: 2048 x 2112 is 15 x 17
= 255 tiles, under two waves of 132 SMs, where the 128x128 / 64x256 block-scaled tiles make 272 / 288.
small_m configs may carry a 6th element: programmatic dependent launch (fp8_small_m.py), where it measured faster.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field

import torch
import triton

from lowbit.kernels import fp8_block, fp8_small_m
from lowbit.kernels.quant_act import GRANULARITIES, quantize_fp8

FP8 = torch.float8_e4m3fn
WEIGHT_GRANULARITIES = ("tensor", "channel", "block")
CANDIDATES = ("small_m", "triton", "cublas", "cublas_block")
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
FUSED_AMAX_MAX_ELEMS = 32768  # small_m computes dynamic token/tensor amax in-kernel up to M*K of this
# ... and K of this: every program re-reads its whole x rows for the amax, one K-block at a time; at K = 7168
# (H100, channel weights, M = 1) that took 25.6 / 35.6 us on 2112x7168 / 4096x7168 against 13.6 / 19.3 us for
# quantize_fp8 + the split-K kernel at M = 16. K <= 1024 is unmeasured and keeps the fused path.
FUSED_AMAX_MAX_K = 1024
_DEFAULT_SELECT = {"small_m_max": 32, "fused_quant_max": 32, "cublas_block_min_m": 33, "cublas_min_m": 33}
COUNTERS_PER_16_ROWS = fp8_small_m.MAX_M_TILED // 16  # split-K tickets: one per (16 weight rows, 16 tokens) tile


@functools.lru_cache(maxsize=None)
def load_config(name: str) -> dict:
    """configs/<name>.json written from bench/ measurements ({} when absent)."""
    path = os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


@dataclass
class Fp8Weights:
    weight: torch.Tensor  # [N, K] e4m3
    granularity: str
    n: int
    k: int
    shard_sizes: tuple[int, ...]
    row_scale: torch.Tensor | None = None  # [N] fp32
    tensor_scale: torch.Tensor | None = None  # [1] fp32
    grid: torch.Tensor | None = None  # [R, ceil(K/128)] fp32
    grid_rows: torch.Tensor | None = None  # [N] int32
    cublas_grid: bool = False  # grid rows are the 128-row blocks of the fused weight (F.scaled_mm layout)
    block: tuple[int, int] | None = None
    counters: torch.Tensor | None = None  # [ceil(N/16) * 16] int32 zeros, split-K tickets (small_m resets them)
    grid_chunks: dict = field(default_factory=dict)  # (k0, k1) -> grid[:, k0/128:k1/128] contiguous (split cuBLAS)
    rows_scales: dict = field(default_factory=dict)  # (n0, n1, k0, k1) -> [n1 - n0, (k1 - k0)/128] col-major (rows)


def _device_ok(device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return (True, "") if cap >= (8, 9) else (False, f"fp8 MMA needs sm89+, this GPU is sm{cap[0]}{cap[1]}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"needs a CUDA GPU (sm89+), device is {device}"


def fp8_can_implement(granularity: str, n: int, k: int, device, block=None) -> tuple[bool, str]:
    if granularity not in WEIGHT_GRANULARITIES:
        return False, f"fp8 weight granularity {granularity!r} is not supported; supported: {WEIGHT_GRANULARITIES}"
    if n <= 0 or k <= 0:
        return False, f"empty weight N={n}, K={k}"
    if granularity == "block":
        if block is None or len(block) != 2 or block[0] <= 0 or block[1] != fp8_block.BLOCK_K:
            return False, f"block size {block} is not supported; supported: (BN, 128) with any BN > 0"
    return _device_ok(device)


def fp8_repack(weight: torch.Tensor, weight_scale: torch.Tensor, granularity: str, shard_sizes, block=None) -> Fp8Weights:
    """Canonical fp8 tensors (scheme.py) -> Fp8Weights, once at load."""
    if weight.dtype != FP8 or weight.dim() != 2:
        raise ValueError(f"fp8_repack: weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    shard_sizes = tuple(int(s) for s in shard_sizes) if shard_sizes else (n,)
    if sum(shard_sizes) != n:
        raise ValueError(f"fp8_repack: shard sizes {shard_sizes} do not add up to N={n}")
    ok, why = fp8_can_implement(granularity, n, k, weight.device, block)
    if not ok and "device" not in why and "GPU" not in why:
        raise ValueError(f"fp8_repack: {why}")
    dev = weight.device
    w = Fp8Weights(weight.contiguous(), granularity, n, k, shard_sizes,
                   counters=torch.zeros(triton.cdiv(n, 16) * COUNTERS_PER_16_ROWS, dtype=torch.int32, device=dev))
    scale = weight_scale.to(device=dev, dtype=torch.float32)
    if granularity == "tensor":
        if scale.numel() != len(shard_sizes):
            raise ValueError(f"fp8_repack: per-tensor weight_scale has {scale.numel()} values for {len(shard_sizes)} shards")
        scale = scale.reshape(-1)
        w.row_scale = torch.cat([scale[i].expand(s) for i, s in enumerate(shard_sizes)]).contiguous()
        if bool((scale == scale[0]).all()):
            w.tensor_scale = scale[:1].contiguous()
    elif granularity == "channel":
        if scale.numel() != n:
            raise ValueError(f"fp8_repack: per-channel weight_scale has {scale.numel()} values for N={n}")
        w.row_scale = scale.reshape(n).contiguous()
    else:
        bn, bk = block
        rows = [math.ceil(s / bn) for s in shard_sizes]
        if tuple(scale.shape) != (sum(rows), math.ceil(k / bk)):
            raise ValueError(f"fp8_repack: block weight_scale shape {tuple(scale.shape)}; shards {shard_sizes} with "
                             f"block {tuple(block)} need ({sum(rows)}, {math.ceil(k / bk)})")
        starts = torch.tensor([0] + rows[:-1], device=dev).cumsum(0)
        w.grid_rows = torch.cat([starts[i] + torch.arange(s, device=dev) // bn
                                 for i, s in enumerate(shard_sizes)]).to(torch.int32)
        w.grid = scale.contiguous()
        w.block = (bn, bk)
        # cuBLAS indexes the grid by (n // 128): true when every shard but the last is whole 128-row blocks
        w.cublas_grid = bn == 128 and all(s % 128 == 0 for s in shard_sizes[:-1])
        if w.cublas_grid and k % 512 == 0:  # the scale slices of every configured call form, made once here
            buckets, split_n_min_m, rows_m, rows_n_m = _split_table(n, k)
            parts_all = {1, *(p for _, p in buckets)}
            forms = {(p, False, False) for p in parts_all} | ({(1, True, False)} if split_n_min_m < 1 << 62 else set())
            forms |= {(p, split_n, True) for rng, split_n in ((rows_m, False), (rows_n_m, True)) if rng[0] <= rng[1]
                      for p in parts_all}
            forms |= {c for _, c in _calls_table(n, k)}
            for form in forms:
                _call_scales(w, *form)
    return w


def _call_scales(w: Fp8Weights, split_k: int, split_n: bool, rows: bool) -> None:
    """Makes (and keeps) the weight-scale slices _cublas_block reads in this call form."""
    chunks = _k_chunks(w.k, split_k)
    for k0, k1 in chunks:
        pieces = _n_pieces(w.n, split_n) if len(chunks) == 1 else [(0, w.n)]
        if rows:
            for n0, n1 in pieces:
                _rows_scales(w, n0, n1, k0, k1)
        elif len(chunks) > 1:
            _grid_chunk(w, k0, k1)
        elif len(pieces) > 1:  # the remainder rows take the rows form either way (_cublas_block)
            _rows_scales(w, *pieces[1], k0, k1)


def _cublas_ok(w: Fp8Weights, act: str, m: int, out_dtype) -> bool:
    if not w.weight.is_cuda or w.n % 16 or w.k % 16:
        return False
    if w.granularity == "block":
        return False
    if act == "token_group":
        return False
    rowwise = w.tensor_scale is None or act == "token"
    return not rowwise or out_dtype == torch.bfloat16  # cuBLAS row-wise scaling writes bf16 only


CUBLAS_BLOCK_MIN_M = 16  # torch 2.11 probes (H100, H200): no cuBLASLt block-scaled algorithm for M = 1, 2, 7; 16-128 ran


def cublas_block_scaling(device) -> bool:
    """Whether cuBLAS runs 1x128 / 128x128 block-scaled fp8 GEMMs on this device: added in cuBLAS 12.9 for Hopper;
    Ada (sm89) has tensor-wide fp8 scaling only (NVIDIA cuBLAS 12.9 release blog and the cuBLAS scaling-mode
    support table), so sm89 takes the Triton block-scaled GEMM instead."""
    device = torch.device(device)
    return (device.type == "cuda" and hasattr(torch.nn.functional, "scaled_mm")
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _cublas_block_ok(w: Fp8Weights, act: str, m: int) -> bool:
    return (w.weight.is_cuda and w.granularity == "block" and w.cublas_grid and act == "token_group"
            and m >= CUBLAS_BLOCK_MIN_M and w.k % 512 == 0 and w.n % 16 == 0  # scale grid K/128 % 4 == 0
            and cublas_block_scaling(w.weight.device))


def select_thresholds(w: Fp8Weights) -> dict:
    """M thresholds of configs/fp8_select.json for this weight: defaults < granularity < granularity "NxK" shape."""
    cfg = load_config("fp8_select")
    sel = {**_DEFAULT_SELECT, **{k: v for k, v in cfg.items() if k in _DEFAULT_SELECT}}
    per = cfg.get(w.granularity, {})
    sel.update({k: v for k, v in per.items() if k in _DEFAULT_SELECT})
    sel.update(per.get("shapes", {}).get(f"{w.n}x{w.k}", {}))
    return sel


def cublas_block_split(w: Fp8Weights, m: int) -> tuple[int, bool, bool]:
    """(split_k, split_n, rows) of the cuBLAS block-wise call at M rows: configs/fp8_select.json block.shapes["NxK"]
    "cublas_block_calls" {"<max M>": [split_k, split_n, rows]} (bench/kernels/fp8_tune.py mid_tune: every form timed
    against the others; the smallest bucket >= M), else "cublas_block_split_k" {"<max M>": pieces} (smallest bucket
    >= M; none above the largest), "cublas_block_split_n_min_m", and the rows variant's M ranges
    "cublas_block_rows_m" / "cublas_block_rows_split_n_m" [lo, hi] (inclusive, hi null: no bound; inside the second,
    rows with split_n; inside either, split_n only there). Measured per shape; (1, False, False) elsewhere."""
    calls = _calls_table(w.n, w.k)
    call = next((c for b, c in calls if m <= b), None)
    if call is not None:
        return call
    buckets, split_n_min_m, rows_m, rows_n_m = _split_table(w.n, w.k)
    split_k = next((s for b, s in buckets if m <= b), 1)
    if rows_n_m[0] <= m <= rows_n_m[1]:
        return split_k, True, True
    if rows_m[0] <= m <= rows_m[1]:
        return split_k, False, True
    return split_k, m >= split_n_min_m, False


def _m_range(key: str, value) -> tuple[int, int]:
    """fp8_select.json [lo, hi] (hi null: unbounded) -> inclusive (lo, hi); absent -> an empty range."""
    if value is None:
        return 1, 0
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], int) or not (
            value[1] is None or isinstance(value[1], int)):
        raise ValueError(f"fp8_select.json: {key} must be [lo, hi] M bounds (hi may be null), got {value!r}")
    return value[0], (1 << 62) if value[1] is None else value[1]


@functools.lru_cache(maxsize=None)
def _split_table(n: int, k: int) -> tuple[tuple[tuple[int, int], ...], int, tuple[int, int], tuple[int, int]]:
    """((max M, split_k) sorted by M, split_n's min M, rows M range, rows + split_n M range) of one shape, parsed once
    (cublas_block_split runs per call)."""
    entry = load_config("fp8_select").get("block", {}).get("shapes", {}).get(f"{n}x{k}", {})
    buckets = tuple(sorted((int(b), s) for b, s in entry.get("cublas_block_split_k", {}).items()))
    return (buckets, entry.get("cublas_block_split_n_min_m", 1 << 62),
            _m_range("cublas_block_rows_m", entry.get("cublas_block_rows_m")),
            _m_range("cublas_block_rows_split_n_m", entry.get("cublas_block_rows_split_n_m")))


@functools.lru_cache(maxsize=None)
def _calls_table(n: int, k: int) -> tuple[tuple[int, tuple[int, bool, bool]], ...]:
    """((max M, (split_k, split_n, rows)) sorted by M) of one shape's "cublas_block_calls", checked once."""
    table = load_config("fp8_select").get("block", {}).get("shapes", {}).get(f"{n}x{k}", {}).get(
        "cublas_block_calls", {})
    out = []
    for b, c in table.items():
        if not (str(b).isdigit() and isinstance(c, list) and len(c) == 3 and isinstance(c[0], int) and c[0] >= 1
                and all(isinstance(v, bool) for v in c[1:])):
            raise ValueError(f"fp8_select.json: block.shapes[{n}x{k}].cublas_block_calls[{b!r}] must map a max M to "
                             f"[split_k >= 1, split_n, rows], got {c!r}")
        out.append((int(b), (c[0], c[1], c[2])))
    return tuple(sorted(out))


# Block weights where cuBLAS has no block scaling (sm89): the per-shape small_m crossovers were measured against cuBLAS
# block-wise, so there small_m keeps M up to where it beat the Triton block GEMM instead (H100, bench/kernels/fp8.py,
# 2112x7168: 13.8 vs 23.0 us at M = 64, 17.3 vs 22.8 at M = 128, 24.7 vs 22.9 at M = 256)
NO_CUBLAS_BLOCK_SMALL_M_MAX = 128


def pick_candidate(w: Fp8Weights, act: str, m: int, out_dtype=torch.bfloat16) -> str:
    """The GEMM for M rows: measured thresholds in configs/fp8_select.json (defaults before measurement)."""
    sel = select_thresholds(w)
    small_max = sel["small_m_max"]
    if w.granularity == "block" and w.weight.is_cuda and not cublas_block_scaling(w.weight.device):
        small_max = max(small_max, NO_CUBLAS_BLOCK_SMALL_M_MAX)
    if m <= min(small_max, fp8_small_m.MAX_M_TILED) or not w.weight.is_cuda:
        return "small_m" if m <= fp8_small_m.MAX_M_TILED else "triton"
    if _cublas_block_ok(w, act, m) and m >= sel["cublas_block_min_m"]:
        return "cublas_block"
    if _cublas_ok(w, act, m, out_dtype) and m >= sel["cublas_min_m"]:
        return "cublas"
    return "triton"


def fuses_quant(w: Fp8Weights, act: str, m: int) -> bool:
    """Whether small_m quantizes 16-bit x in-kernel at M rows (else quantize_fp8 runs first): every N tile
    re-quantizes its x rows, which costs more than the separate pass as M grows (fused_quant_max, measured)."""
    if m > min(select_thresholds(w)["fused_quant_max"], fp8_small_m.MAX_M):
        return False
    return act not in ("token", "tensor_dynamic") or (m * w.k <= FUSED_AMAX_MAX_ELEMS and w.k <= FUSED_AMAX_MAX_K)


def small_m_config(n: int, k: int, m: int, sms: int = 132, row_scale: bool = False) -> tuple:
    """configs/fp8_small_m.json for this shape and M bucket; else 64-row weight tiles, 4 warps, 3 stages and
    splits for ~3.5 programs per SM (M <= 32) or ~2 (above), the pattern of the H100 winners in bench/kernels/fp8.py
    split_k_sweep (14 shapes, M = 1..256: BLOCK_N 64 won on 10 of 14 shapes at M = 1, 128 on the others).
    row_scale (per-tensor / per-channel weights: no per-K-block scales): the "row_scale" table first, up to its
    largest M bucket (bench/kernels/fp8_tune.py row_tune; the main table was tuned on block weights)."""
    tuned = load_config("fp8_small_m")
    row_table = tuned.get("row_scale", {}) if row_scale else {}
    rows = row_table.get(f"{n}x{k}")
    if rows and m <= max(int(b) for b in rows):
        return fp8_small_m.small_m_config(n, k, sms, row_table, m)
    if f"{n}x{k}" in tuned:
        return fp8_small_m.small_m_config(n, k, sms, tuned, m)
    block_n = 64 if n >= 256 else 32
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, 64)
    kb = triton.cdiv(k, fp8_block.BLOCK_K)
    splits = max(1, min(16, kb // 2, round((3.5 if m <= 32 else 2.0) * sms / tiles)))
    return block_n, splits, 4, 3, 64


@functools.lru_cache(maxsize=None)
def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


_SMALL_MODES = {"tensor_static": fp8_small_m.A_STATIC, "token_group": fp8_small_m.A_DYN_GROUP,
                "token": fp8_small_m.A_DYN_TOKEN, "tensor_dynamic": fp8_small_m.A_DYN_TENSOR}


def _weight_args(w: Fp8Weights):
    if w.granularity == "block":
        return w.grid, w.grid_rows
    return w.row_scale, None


def fp8_linear(x: torch.Tensor, w: Fp8Weights, act_granularity: str, input_scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               x_scale: torch.Tensor | None = None, ue8m0: bool = False, candidate: str | None = None,
               tma: bool | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias). x 16/32-bit is quantized here per act_granularity (token_group:
    G = 128; input_scale for tensor_static); x already e4m3 comes with x_scale (quantize_fp8's layout)."""
    if act_granularity not in GRANULARITIES:
        raise ValueError(f"fp8_linear: activation granularity {act_granularity!r} is not supported; "
                         f"supported: {GRANULARITIES}")
    if x.shape[-1] != w.k:
        raise ValueError(f"fp8_linear: x has K={x.shape[-1]}, the weight K={w.k}")
    pre = x.dtype == FP8
    if pre and (x_scale is None or out_dtype is None):
        raise ValueError("fp8_linear: e4m3 input needs x_scale and out_dtype")
    if not pre and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fp8_linear: x dtype {x.dtype} is not supported; supported: fp16, bf16, fp32, float8_e4m3fn")
    if act_granularity == "tensor_static" and not pre and (input_scale is None or input_scale.numel() != 1):
        raise ValueError("fp8_linear: tensor_static activations need a one-element input_scale (max over shards)")
    if bias is not None and bias.shape != (w.n,):
        raise ValueError(f"fp8_linear: bias shape {tuple(bias.shape)}, expected ({w.n},)")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cand = candidate or pick_candidate(w, act_granularity, m, out_dtype)
    if cand not in CANDIDATES:
        raise ValueError(f"fp8_linear: candidate {cand!r} is not supported; supported: {CANDIDATES}")
    w_scale, w_rows = _weight_args(w)

    if cand == "small_m":
        if not pre and fuses_quant(w, act_granularity, m):
            mode, xs = _SMALL_MODES[act_granularity], input_scale
        else:
            if not pre:
                x2, x_scale = quantize_fp8(x2, act_granularity, input_scale, 128, ue8m0, column_major_scales=True)
            mode = fp8_small_m.A_FP8_GROUP if act_granularity == "token_group" else fp8_small_m.A_FP8_ROW
            xs = x_scale
        cfg = small_m_config(w.n, w.k, m, _sms(x2.device), row_scale=w.granularity != "block")
        y = fp8_small_m.fp8_small_m(x2, xs, mode, w.weight, w_scale, w_rows, w.counters, w.n, w.k, bias=bias,
                                    out_dtype=out_dtype, ue8m0=ue8m0, config=cfg)
        return y.reshape(*lead, w.n)

    if pre:
        xq, xs = x2, x_scale
    else:
        xq, xs = quantize_fp8(x2, act_granularity, input_scale, 128, ue8m0, column_major_scales=True)
    if cand == "triton":
        tuned = load_config("fp8_block")
        y = fp8_block.fp8_block_gemm(xq, xs, act_granularity == "token_group", w.weight, w_scale, w_rows, w.n, w.k,
                                     bias=bias, out_dtype=out_dtype, config=fp8_block.block_config(m, tuned),
                                     tma=bool(tuned.get("tma", False)) if tma is None else tma)
    elif cand == "cublas":
        y = _cublas(xq, xs, w, act_granularity, bias, out_dtype)
    else:
        y = _cublas_block(xq, xs, w, bias, out_dtype, *cublas_block_split(w, m))
    return y.reshape(*lead, w.n)


def _cublas(xq, xs, w: Fp8Weights, act, bias, out_dtype):
    if not _cublas_ok(w, act, xq.shape[0], out_dtype):
        raise ValueError(f"fp8_linear: cuBLAS cannot run {w.granularity} weights with {act} activations, "
                         f"N={w.n}, K={w.k}, out {out_dtype}")
    if w.tensor_scale is not None and act != "token":
        y = torch._scaled_mm(xq, w.weight.t(), scale_a=xs.reshape(()), scale_b=w.tensor_scale.reshape(()),
                             bias=bias, out_dtype=out_dtype)
    else:
        sa = xs.reshape(-1, 1).expand(xq.shape[0], 1).contiguous()  # [M, 1] fp32
        y = torch._scaled_mm(xq, w.weight.t(), scale_a=sa, scale_b=w.row_scale.reshape(1, -1), bias=bias,
                             out_dtype=out_dtype)
    return y


def _block_mm(xq, xs, wq, wscale, out_dtype, out=None, rows=False):
    """cuBLAS block-wise GEMM: xq [M, K] e4m3 with xs [M, K/128] (column-major), wq [N, K] with wscale the grid
    [N/128, K/128] (BlockWise128x128) or, rows, [N, K/128] column-major (BlockWise1x128: _rows_scales).
    out: a [M, N] view with unit column stride (a column slice of a wider y: cuBLAS writes with its row stride)."""
    F = torch.nn.functional
    recipe = F.ScalingType.BlockWise1x128 if rows else F.ScalingType.BlockWise128x128
    args = (xq, wq.t(), [xs], [F.ScalingType.BlockWise1x128.value], [], [wscale if rows else wscale.t()],
            [recipe.value], [], None, out_dtype, [], False)
    if out is None:
        return torch.ops.aten._scaled_mm_v2(*args)
    return torch.ops.aten._scaled_mm_v2.out(*args, out=out)


@functools.lru_cache(maxsize=None)
def side_streams(device: torch.device, count: int) -> tuple:
    """Streams on which split cuBLAS calls run beside the current stream (fork/join; CUDA graphs capture branches)."""
    return tuple(torch.cuda.Stream(device) for _ in range(count))


def _k_chunks(k: int, parts: int) -> list[tuple[int, int]]:
    """parts K ranges in whole 512-wide pieces (cuBLAS: K / 128 of each scale slice % 4 == 0), front-loaded."""
    assert k % 512 == 0, k  # _cublas_block_ok
    pieces = k // 512
    parts = max(1, min(parts, pieces))
    sizes = [pieces // parts + (i < pieces % parts) for i in range(parts)]
    bounds, k0 = [], 0
    for sz in sizes:
        bounds.append((k0, k0 + sz * 512))
        k0 += sz * 512
    return bounds


def _grid_chunk(w: Fp8Weights, k0: int, k1: int) -> torch.Tensor:
    """The weight scales of K piece [k0, k1) as cuBLAS takes them (inner-dim-major, row stride = its K / 128); kept
    on the weight unless made during a CUDA graph capture (there the copy is part of the graph)."""
    g = w.grid_chunks.get((k0, k1))
    if g is None:
        g = w.grid[:, k0 // 128:k1 // 128].contiguous()
        if not (g.is_cuda and torch.cuda.is_current_stream_capturing()):
            w.grid_chunks[(k0, k1)] = g
    return g


def _rows_scales(w: Fp8Weights, n0: int, n1: int, k0: int, k1: int) -> torch.Tensor:
    """Weight rows [n0, n1) (n0 % 128 == 0), K piece [k0, k1): [n1 - n0, (k1 - k0) / 128] fp32 with strides
    (1, n1 - n0), each 128x128 block's scale repeated on its 128 rows (cuBLAS BlockWise1x128 for the weight, the
    layout of w4a8._scales_f32); kept on the weight unless made during a CUDA graph capture, as _grid_chunk."""
    s = w.rows_scales.get((n0, n1, k0, k1))
    if s is None:
        assert n0 % 128 == 0 and w.cublas_grid, (n0, w.cublas_grid)  # grid row of weight row r is r // 128
        g = w.grid[n0 // 128:-(-n1 // 128), k0 // 128:k1 // 128]  # [blocks, K piece / 128]
        s = g.t().repeat_interleave(128, 1)[:, :n1 - n0].contiguous().t()
        if not (s.is_cuda and torch.cuda.is_current_stream_capturing()):
            w.rows_scales[(n0, n1, k0, k1)] = s
    return s


def _n_pieces(n: int, split_n: bool) -> list[tuple[int, int]]:
    """Weight row ranges: all N, or with split_n the whole 128-row blocks and the rows past them."""
    n_main = n // 128 * 128 if split_n and n % 128 and n > 128 else n
    return [(0, n)] if n_main == n else [(0, n_main), (n_main, n)]


def _cublas_block(xq, xs, w: Fp8Weights, bias, out_dtype, split_k: int = 1, split_n: bool = False,
                  rows: bool = False):
    """split_k > 1: K in split_k pieces, each a cuBLAS call on its own stream into an fp32 partial, summed after (few
    output tiles at small M: 2112x7168 has 17 at M <= 128 on 132 SMs). split_n: N past the last whole 128 rows runs
    on a side stream beside the main call (2112 = 16.5 x 128 at M = 2048 is 272 tiles: 3 waves where the area is 2);
    with split_k > 1 it is not applied (the K pieces already fill the GPU where split_k was measured faster). rows:
    the weight scales one per row per 128 columns (_rows_scales), BlockWise1x128 x BlockWise1x128, with either split."""
    if not _cublas_block_ok(w, "token_group", xq.shape[0]):
        raise ValueError(f"fp8_linear: cuBLAS block scaling cannot run N={w.n}, K={w.k}, M={xq.shape[0]}, "
                         f"block {w.block} (needs 128x128 blocks on 128-row boundaries, K % 512 == 0, M >= 16)")
    if xs.stride(0) != 1:  # cuBLAS wants the [M, K/128] activation scales column-major
        xs = xs.t().contiguous().t()
    m, dev = xq.shape[0], xq.device
    chunks = _k_chunks(w.k, split_k)
    pieces = _n_pieces(w.n, split_n) if len(chunks) == 1 else [(0, w.n)]

    def scales(n0, n1, k0, k1):
        if rows:
            return _rows_scales(w, n0, n1, k0, k1)
        return w.grid[n0 // 128:-(-n1 // 128)] if (k0, k1) == (0, w.k) else _grid_chunk(w, k0, k1)  # split_k: all N

    if len(chunks) == 1 and len(pieces) == 1:
        y = _block_mm(xq, xs, w.weight, scales(0, w.n, 0, w.k), out_dtype, rows=rows)
        return y if bias is None else y.add_(bias)
    main = torch.cuda.current_stream(dev)
    side = side_streams(dev, len(chunks) - 1 + len(pieces) - 1)
    for st in side:
        st.wait_stream(main)
    if len(chunks) > 1:
        part = torch.empty((len(chunks), m, w.n), dtype=torch.float32, device=dev)
        for i, (k0, k1) in enumerate(chunks):
            with torch.cuda.stream(side[i - 1] if i else main):
                _block_mm(xq[:, k0:k1], xs[:, k0 // 128:k1 // 128], w.weight[:, k0:k1], scales(0, w.n, k0, k1),
                          torch.float32, out=part[i], rows=rows)
    else:
        y = torch.empty((m, w.n), dtype=out_dtype, device=dev)
        (n0, n1), (n2, n3) = pieces
        _block_mm(xq, xs, w.weight[n0:n1], scales(n0, n1, 0, w.k), out_dtype, out=y[:, n0:n1], rows=rows)
        with torch.cuda.stream(side[-1]):  # fewer than 128 rows: the rows form (in the 128x128 one cuBLAS took 2x)
            _block_mm(xq, xs, w.weight[n2:n3], _rows_scales(w, n2, n3, 0, w.k), out_dtype, out=y[:, n2:n3], rows=True)
    for st in side:
        main.wait_stream(st)
    if len(chunks) > 1:
        y = part.sum(0).to(out_dtype)
    return y if bias is None else y.add_(bias)
