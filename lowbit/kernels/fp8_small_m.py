"""Split-K fp8-weight GEMM for M <= 256 (decode and small prefill), streaming weights at HBM bandwidth.

y^T [N, M] = sum over K-splits of W [N, K] @ xq^T [K, M]: the weight rows are the MMA's M side (BLOCK_N >= 16),
the tokens its N side (BLOCK_M = 16..128 per program; more tokens are more M tiles on program axis 2), so no
MMA lane idles on padding rows of W. Scales as in fp8_block.py: per K-block of 128 (activation groups, weight
block grids) inside the loop, per row / per tensor in the epilogue. With SPLIT > 1 each program
stores an fp32 partial of its real rows only ([min(BLOCK_M, M), BLOCK_N]: at M = 1 that is 1/16 of the padded
tile); the last program of an (N, M) tile to arrive (ticket counter, acq_rel) sums the partials in split order
(deterministic), writes y and resets its counter to 0, so no memset is launched. Partial bytes grow as
SPLIT * M * N * 4 while the weight is N * K, so configs for larger M use fewer splits (configs/fp8_small_m.json).
Tried and measured 9-61% slower on H100 (bench/kernels/fp8.py; 2112x7168, 4096x7168, 7168x16384; M = 1..256):
loading x and the scales one K-block ahead in registers together with summing several partials per load; and
(2026-11-26) a GEMV form for M = 1..4 - no MMA, each K-block's e4m3 products in fp32 summed over K by tl.sum over a
[BLOCK_N, M, 128] tile - 2.4-11x slower than the MMA form on 2112x7168 .. 7168x16384 over 48 configs.
Also not kept (H100, 2026-11-26, fourth session; same sweep, token_group x quantized in-kernel, M = 1 / 16): thinner
weight tiles over fewer splits, and 2 or 4 K-blocks per loop iteration (more bytes per pipeline stage): 2112x7168
M = 1 took 17.8 / 13.0 / 11.3 us with 16 / 32 / 64-row tiles (best split, warps, stages each) and 12.5 / 16.7 us with
2 / 4 K-blocks per iteration; 4096x7168 30.8 / 20.1 / 15.9 us and 17.3 us. The per-K-block x quantization and scale
work is paid per tile, so thin tiles cost more than their extra bytes in flight give. A bare streaming read of the
weight bytes timed the same way (best of 40 launch shapes) took 7.7 / 12.3 / 40.9 us on 2112x7168 / 4096x7168 /
7168x16384: 65 / 79 / 95% of the copy bandwidth, so at these sizes launch and ramp-up latency bound any kernel.
Also not kept (H100, seventh session, token_group x in-kernel, M = 1 / 16, all 14 fp8 sweep shapes): the weight tile
through a TMA descriptor (host TensorDescriptor, block [BLOCK_N, 128]) on the table's config and 24 variants (64 / 128
rows, 0.5-2x the splits, 3 / 4 / 6 stages): the best of them from 2% faster (32768x512) to 4% slower (2112x7168) than
these pointer loads, one run (4096x7168 M = 1: 16.6 vs 16.1 us), while a bare TMA read of the same bytes reached 64-95%
of copy (13.3 us there).
Where the M <= 16 time goes (H100, tenth session, M = 1, best of 9 launch shapes per mode, CUDA-graph replay,
bench/results/h100.json fp8_decode_modes): cuBLAS tensor-wise fp8 on e4m3 x runs one kernel without a split-K pass
(nvjet_sm90_qqtst_64x8_128x16_4x1, the same on all six shapes probed). This kernel in its plainest mode (e4m3 x, one
scale per tensor and per weight row) ties it where one split fills the GPU and trails by 1.2 us on 4096x7168 (14.07 vs
12.86 us; 7168x2048 7.98 vs 8.04, 6144x4096 12.29 vs 12.30, 10240x5120 21.03 vs 20.76), on 5 stages, one split.
Block-wise scales add 0.5-0.9 us, pre-quantized token-group x another 0.0-0.3, and quantizing x in-kernel
(A_MODE 3, what the selection runs up to fused_quant_max) another 0.2-1.5: 15.14 / 23.71 / 10.01 / 13.63 us on those
shapes, 65 / 74 / 49 / 62% of HBM. Even the plain mode stays under 70% on the 15-29 MB weights.
Every K-block's MMA result is added to the fp32 accumulator separately (sm90 fp8 MMAs keep ~14 bits while
accumulating, fp8_block.py). In-kernel quantization multiplies by 1 / scale (quant_act.quantize_tile_rcp),
so a code can differ from quantize_fp8 by one e4m3 step where x / s is within an fp32 ulp of a tie; the GEMM
budgets absorb that.

| A_MODE | x                         | activation scale                                               |
|--------|---------------------------|----------------------------------------------------------------|
| 0      | e4m3 [M, K] (quantized)   | xs [M] or [1] (stride 0): per token / per tensor               |
| 1      | e4m3 [M, K] (quantized)   | xs [M, ceil(K/128)] per token group                            |
| 2      | 16-bit [M, K]             | static: xs [1]; x * (1 / xs) rounded in-kernel                 |
| 3      | 16-bit [M, K]             | dynamic token_group 128 computed per K-block in-kernel (UE8M0)  |
| 4 / 5  | 16-bit [M, K]             | dynamic token / tensor: an amax prologue reads the whole x (5: one M tile) |
Weights: e4m3 [N, K]; weight scale [N] or grid + rb (fp8_block.py).
Workspace: part fp32 [SPLIT, M, N] (torch.empty per call), counters int32 [>= M tiles * ceil(N/BLOCK_N)] zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lowbit.kernels.fp8_block import BLOCK_K, load_w_tile
from lowbit.kernels.quant_act import fp8_scale, quantize_tile_rcp, soft_cast

A_FP8_ROW, A_FP8_GROUP, A_STATIC, A_DYN_GROUP, A_DYN_TOKEN, A_DYN_TENSOR = range(6)
MAX_M = 64  # one M tile (A_DYN_TENSOR needs all rows in one tile)
MAX_M_TILED = 256  # several M tiles: the mid-M range of fp8_gemm.py


@triton.jit
def _x_load(x_ptr, xs_ptr, sw_rows, offs_m, mask_m, mask_n, k0, k_hi, stride_xm, stride_xsm, stride_xsk,
            A_MODE: tl.constexpr, B_GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """Loads of K-block k0 (all masked off past k_hi): x [BLOCK_M, BLOCK_K] as stored, the per-K activation
    scale [BLOCK_M] (A_MODE 1) and weight scale [BLOCK_N] (B_GRID); ones where a mode has none."""
    kk = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < k_hi),
                other=0.0)
    live = k0 < k_hi
    sa = tl.full([BLOCK_M], 1.0, tl.float32)
    if A_MODE == 1:
        sa = tl.load(xs_ptr + offs_m * stride_xsm + (k0 // BLOCK_K) * stride_xsk, mask=mask_m & live, other=0.0)
    sb = tl.full([BLOCK_N], 1.0, tl.float32)
    if B_GRID:
        sb = tl.load(sw_rows + k0 // BLOCK_K, mask=mask_n & live, other=0.0)
    return x, sa, sb


@triton.jit
def _x_quant(x, sa_k, sa_row, A_MODE: tl.constexpr, UE8M0: tl.constexpr, SOFT: tl.constexpr):
    """x K-block as e4m3 and its per-K scale [BLOCK_M] (1 where the scale is per row)."""
    if A_MODE == 0:
        xq, sa = x, sa_row
    elif A_MODE == 1:
        xq, sa = x, sa_k
    elif A_MODE == 3:
        xf = x.to(tl.float32)
        sa = fp8_scale(tl.max(tl.abs(xf), axis=1), UE8M0)
        xq = quantize_tile_rcp(xf, (1.0 / sa)[:, None], SOFT)
    else:
        xq, sa = quantize_tile_rcp(x.to(tl.float32), (1.0 / sa_row)[:, None], SOFT), sa_row
    return xq, sa


@triton.jit(do_not_specialize=["M"])
def fp8_small_m_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, rb_ptr, bias_ptr, part_ptr, cnt_ptr, y_ptr,
    M, N, K, k_split, n_split,  # k_split: K per split, a multiple of BLOCK_K; n_split: number of splits
    stride_xm, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_wsr, stride_ym,
    A_MODE: tl.constexpr, UE8M0: tl.constexpr, B_GRID: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SOFT: tl.constexpr, PDL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    if PDL:  # programmatic dependent launch: everything after the previous kernel (x, partials and counters)
        gdc_wait()
        gdc_launch_dependents()

    # per-token / per-tensor activation scale [BLOCK_M] (all ones where it is per K-block)
    sa_row = tl.full([BLOCK_M], 1.0, tl.float32)
    if A_MODE == 0:
        sa_row = tl.load(xs_ptr + offs_m * stride_xsm, mask=mask_m, other=1.0)
    elif A_MODE == 2:
        sa_row = tl.load(xs_ptr) + tl.zeros([BLOCK_M], tl.float32)
    elif A_MODE >= 4:  # dynamic: amax over the whole row (4) or all rows (5); x is small when M is
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K),
                         other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xt.to(tl.float32)), axis=1))
        if A_MODE == 5:
            amax = tl.max(amax, axis=0) + tl.zeros([BLOCK_M], tl.float32)
        sa_row = fp8_scale(amax, False)
    sw_rows = ws_ptr
    if B_GRID:
        sw_rows = ws_ptr + tl.load(rb_ptr + offs_n, mask=mask_n, other=0) * stride_wsr

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = load_w_tile(w_ptr, offs_n, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K)  # [BN, BK]
        x, sa_k, sb = _x_load(x_ptr, xs_ptr, sw_rows, offs_m, mask_m, mask_n, k0, k_hi, stride_xm, stride_xsm,
                              stride_xsk, A_MODE, B_GRID, BLOCK_N, BLOCK_M, BLOCK_K)
        xq, sa = _x_quant(x, sa_k, sa_row, A_MODE, UE8M0, SOFT)
        if (A_MODE == 1) or (A_MODE == 3) or B_GRID:  # scales change every K-block
            part = tl.dot(w, tl.trans(xq))  # [BN, BM]
            if B_GRID:
                if (A_MODE == 1) or (A_MODE == 3):
                    acc += part * (sb[:, None] * sa[None, :])
                else:
                    acc += part * sb[:, None]
            else:
                acc += part * sa[None, :]
        else:
            acc += tl.dot(w, tl.trans(xq))  # promoted every K-block (fp8 MMA accumulation is ~14-bit, fp8_block.py)

    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    y_mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT:
        # partial [M, N] of split pid_k (real rows only); the last program of this (N, M) tile reduces in split order
        p_ptrs = part_ptr + offs_m[None, :] * N + offs_n[:, None]
        split_stride = M * N
        tl.store(p_ptrs + pid_k * split_stride, acc, mask=y_mask)
        tl.debug_barrier()
        cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(0, n_split):
                acc += tl.load(p_ptrs + s * split_stride, mask=y_mask, other=0.0, cache_modifier=".cg")
            acc = _epilogue(acc, sa_row, ws_ptr, bias_ptr, offs_n, mask_n, A_MODE, B_GRID, HAS_BIAS)
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt, 0)  # ready for the next launch
    else:
        acc = _epilogue(acc, sa_row, ws_ptr, bias_ptr, offs_n, mask_n, A_MODE, B_GRID, HAS_BIAS)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _epilogue(acc, sa_row, ws_ptr, bias_ptr, offs_n, mask_n,
              A_MODE: tl.constexpr, B_GRID: tl.constexpr, HAS_BIAS: tl.constexpr):
    if (A_MODE != 1) and (A_MODE != 3):
        acc = acc * sa_row[None, :]
    if not B_GRID:
        acc = acc * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    return acc


def small_m_config(n: int, k: int, sms: int = 132, tuned: dict | None = None, m: int = 1) -> tuple[int, ...]:
    """(BLOCK_N, splits, num_warps, num_stages[, BLOCK_M cap]). tuned["NxK"] is one config for every M, or
    {"<max M>": config, ...} by M bucket (the smallest bucket >= m; the largest beyond). Default: ~3 programs per
    SM streaming 128-row weight tiles (the M <= 16 winners of bench/kernels/fp8_tune.py `tune` on DeepSeek-V3 shapes)."""
    entry = (tuned or {}).get(f"{n}x{k}")
    if isinstance(entry, dict):
        buckets = sorted((int(b), c) for b, c in entry.items())
        entry = next((c for b, c in buckets if m <= b), buckets[-1][1])
    if entry:
        return tuple(entry)
    kb = triton.cdiv(k, BLOCK_K)
    block_n = 128 if n >= 1024 else 64 if n >= 256 else 32
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, 64)
    splits = max(1, min(16, kb // 2, round(3 * sms / tiles)))
    if m > 64:  # partials grow with M: split only what the weight tiles leave idle
        splits = max(1, min(splits, round(1.5 * sms / tiles)))
    return block_n, splits, 8, 3


def fp8_small_m(x: torch.Tensor, x_scale: torch.Tensor | None, a_mode: int, w: torch.Tensor, w_scale: torch.Tensor,
                w_rows: torch.Tensor | None, counters: torch.Tensor, n: int, k: int,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, ue8m0: bool = False,
                config: tuple | None = None, pdl: bool = False) -> torch.Tensor:
    """y [M, N] for M <= MAX_M_TILED (see the table); callers validate the weights (fp8_gemm.py).
    config: (BLOCK_N, splits, num_warps, num_stages[, BLOCK_M cap, default 64[, pdl]]). pdl (sm90+ GPUs): launch as a
    programmatic dependent of the kernel before: its programs start during that kernel's tail and wait in
    griddepcontrol.wait before touching anything (H100, back-to-back graph replays, bench/kernels/fp8_tune.py split_tune:
    2112x7168 M = 1 / 16 11.7 -> 11.1 / 11.9 -> 11.1 us; 4096x7168, 7168x16384, 7168x2048 equal or up to 10% slower,
    so configs turn it on per shape; after a non-PDL kernel it changes nothing. An L2 prefetch of the weight tile
    before the wait measured 1-2 us slower on every shape, so there is none)."""
    m = x.shape[0]
    max_m = MAX_M if a_mode == A_DYN_TENSOR else MAX_M_TILED
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1 or m > max_m:
        raise ValueError(f"fp8_small_m: x must be [M <= {max_m}, {k}] with unit stride along K (activation mode "
                         f"{a_mode}), got {tuple(x.shape)} strides {x.stride()}")
    if (x.dtype == torch.float8_e4m3fn) != (a_mode in (A_FP8_ROW, A_FP8_GROUP)):
        raise ValueError(f"fp8_small_m: x dtype {x.dtype} does not fit activation mode {a_mode}")
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    cfg = tuple(config) if config else small_m_config(n, k, sms, m=m)
    block_n, splits, warps, stages = cfg[:4]
    pdl = pdl or (len(cfg) > 5 and bool(cfg[5]))
    m_cap = MAX_M if a_mode == A_DYN_TENSOR else (cfg[4] if len(cfg) > 4 else 64)  # tensor amax: every row in one tile
    block_m = max(16, triton.next_power_of_2(min(m, m_cap)))
    kb = triton.cdiv(k, BLOCK_K)
    k_split = triton.cdiv(kb, splits) * BLOCK_K
    splits = triton.cdiv(k, k_split)  # no empty splits
    tiles, m_tiles = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    if splits > 1 and counters.numel() < tiles * m_tiles:
        raise ValueError(f"fp8_small_m: {counters.numel()} split-K counters for {m_tiles} x {tiles} tiles of "
                         f"{block_m} x {block_n}")
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    xs = x_scale if x_scale is not None else y
    pdl = pdl and pdl_ok(x.device)
    extra = {"launch_pdl": True} if pdl else {}
    if a_mode == A_FP8_GROUP:
        stride_xsm, stride_xsk = xs.stride(0), xs.stride(1)
    else:
        stride_xsm, stride_xsk = (xs.stride(0) if a_mode == A_FP8_ROW and xs.numel() > 1 else 0), 0
    fp8_small_m_kernel[(tiles, splits, m_tiles)](
        x, xs, w, w_scale, w_rows if w_rows is not None else w_scale, bias if bias is not None else y, part,
        counters, y, m, n, k, k_split, splits, x.stride(0), stride_xsm, stride_xsk, w.stride(0), w.stride(1),
        w_scale.stride(0) if w_rows is not None else 0, y.stride(0),
        A_MODE=a_mode, UE8M0=ue8m0, B_GRID=w_rows is not None, HAS_BIAS=bias is not None,
        SPLIT=splits > 1, SOFT=soft_cast(), PDL=pdl, BLOCK_N=block_n, BLOCK_M=block_m,
        BLOCK_K=BLOCK_K, num_warps=warps, num_stages=stages, **extra)
    return y


def pdl_ok(device) -> bool:
    """griddepcontrol needs a real sm90+ GPU (not the interpreter)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
