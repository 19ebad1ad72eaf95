"""fp8 block-scaled GEMM for large M on sm90, in Gluon (DeepSeek-V3 w8a8: 1 x 128 activation groups, 128 x 128
weight blocks), the third block-wise candidate beside cuBLAS (F.scaled_mm) and the Triton kernel (fp8_block.py):

    y[m, n] = sum_kb sa[m, kb] * sb[n // 128, kb] * (sum_{k in block kb} xq[m, k] * wq[n, k])     (+ bias[n])

Per K-block kb (128 columns) an asynchronous wgmma (swap AB as w4a16_wgmma.py: weight rows the M side, 64 per
warpgroup, tokens the N side) writes a fresh fp32 partial, which is then scaled into the accumulator ("promotion":
sm90 fp8 MMAs keep ~14 bits while accumulating, fp8_block.py; DeepGEMM promotes per 128 the same way). Two partial
register tiles alternate, so block kb + 1's wgmma runs while block kb is promoted on the CUDA cores; the scales of a
block load one block ahead. TMA keeps STAGES blocks of x and w in flight; a stage is refilled once both warpgroups
are past the wgmma that read it (one CTA barrier per block). TAIL_SPLIT as in w4a16_wgmma.py: the tiles of a last
partial wave are split over K into fp32 partials summed by the tile's last CTA (w4a16_wgmma._finish_split).
Weight tiles are 128 rows aligned to the 128-row scale blocks, so sb is one scalar per (tile, block).

| tensor | dtype | shape          | notes                                                             |
|--------|-------|----------------|-------------------------------------------------------------------|
| xq     | e4m3  | [M, K]         | unit column stride, row stride % 16 bytes == 0 (TMA)              |
| xs     | fp32  | [M, ceil(K/128)] | any strides (quantize_fp8's column-major token_group scales)   |
| wq     | e4m3  | [N, K]         | row-major (Fp8Weights.weight), K % 16 == 0                        |
| grid   | fp32  | [ceil(N/128), ceil(K/128)] | Fp8Weights.grid with cublas_grid (128-row blocks of the fused weight) |
| y      | bf16 / fp16 / fp32 | [M, N] |                                                            |
| ws     | fp32  | [S, split tiles, BN * BM] | tail-split partials                                      |
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from lowbit.kernels.w4a16_wgmma import tail_split

BLOCK_K = 128
DEFAULT_CONFIG = {"BLOCK_N": 128, "BLOCK_M": 128, "num_stages": 4, "num_warps": 8, "GROUP_M": 8, "TAIL_SPLIT": True,
                  "OVERLAP": False}


@gluon.jit
def _scales(sa_g, sb_g, kb, offs_m, M, stride_sam, stride_sak, stride_sbk):
    """Block kb's activation scales [BM] (zero past M) times its weight block's scale: the promotion factor."""
    sa = gl.load(sa_g + offs_m * stride_sam + kb * stride_sak, mask=offs_m < M, other=0.0)
    return sa * gl.load(sb_g + kb * stride_sbk)


@gluon.jit
def _issue(kb, t, x_smem, w_smem, bars, STAGES: gl.constexpr):
    """Wait for block kb's stage and start its wgmma into a fresh partial t (returns the in-flight token)."""
    st = kb % STAGES
    mbarrier.wait(bars.index(st), (kb // STAGES) & 1)
    return warpgroup_mma(x_smem.index(st), w_smem.index(st).permute((1, 0)), t, use_acc=False, is_async=True)


@gluon.jit
def _retire(kb, t, acc, f, x_desc, w_desc, x_smem, w_smem, bars, m0, n0, kb0, num_kb, STAGES: gl.constexpr):
    """Block kb's wgmma done (<= 1 in flight, the next block's): acc += t * f; once every warpgroup is past it, its
    stage takes block kb + STAGES."""
    t = warpgroup_mma_wait(num_outstanding=1, deps=(t,))
    acc = acc + t * f[:, None]
    gl.thread_barrier()
    _refill(kb + STAGES, x_desc, w_desc, x_smem, w_smem, bars, m0, n0, kb0, num_kb, STAGES)
    return t, acc


@gluon.jit
def _refill(nk, x_desc, w_desc, x_smem, w_smem, bars, m0, n0, kb0, num_kb, STAGES: gl.constexpr):
    """TMA of this CTA's K-block nk (global kb0 + nk) into its stage, if it exists."""
    ok = nk < num_kb
    sp = nk % STAGES
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    mbarrier.expect(bars.index(sp), NBYTES, pred=ok)
    tma.async_copy_global_to_shared(x_desc, [m0, (kb0 + nk) * 128], bars.index(sp), x_smem.index(sp), pred=ok)
    tma.async_copy_global_to_shared(w_desc, [n0, (kb0 + nk) * 128], bars.index(sp), w_smem.index(sp), pred=ok)


@gluon.jit
def _store(acc, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, OUT_L: gl.constexpr):
    """y tile [BM, BN] (+ bias) -> y [M, N], 16 contiguous bytes per thread along N."""
    out = gl.convert_layout(acc, OUT_L)
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, OUT_L))
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, OUT_L))
    if HAS_BIAS:
        out = out + gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(gl.int64) * stride_ym + offs_n[None, :]
    gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@gluon.jit
def _finish_split(acc, ws_ptr, lock, base, stride, piece, pieces, bias_ptr, y_ptr, M, N, stride_ym, m0, n0,
                  HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, ACC_L: gl.constexpr,
                  OUT_L: gl.constexpr):
    """Piece `piece` of a tile cut over K (as w4a16_wgmma._finish_split): its fp32 partial to workspace slot
    piece * stride + base in the accumulator's own layout; the last piece to arrive (atomic ticket) sums all of
    them in piece order, stores y and resets the ticket for the next launch and CUDA-graph replays."""
    TILE: gl.constexpr = BLOCK_M * BLOCK_N
    loc = (gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_L))[:, None] * BLOCK_N
           + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_L))[None, :])
    gl.store(ws_ptr + (piece * stride + base).to(gl.int64) * TILE + loc, acc)
    gl.thread_barrier()  # every thread's partial is written before the release below
    arrived = gl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
    if arrived == pieces - 1:
        total = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC_L)
        for p in range(0, pieces):
            total += gl.load(ws_ptr + (p * stride + base).to(gl.int64) * TILE + loc, cache_modifier=".cg")
        gl.atomic_xchg(lock, 0)
        _store(total, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M, BLOCK_N, OUT_L)


@gluon.jit
def fp8_wgmma_kernel(x_desc, w_desc, sa_ptr, sb_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, stride_sam,
                     stride_sak, stride_sbn, stride_sbk, total_kb, kb_per_split, full_tiles, splits,
                     HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr,
                     STAGES: gl.constexpr, SPLIT: gl.constexpr, OVERLAP: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    # tokens are the wgmma M side (64 per warpgroup): a thread's accumulator spans 2 rows, so the per-token scale of
    # a promotion is 2 registers (with tokens on the N side it was BLOCK_M / 4 and the kernel spilled)
    ACC_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                    instr_shape=[16, BLOCK_N, 32])
    OUT_L: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])

    # programs 0 .. full_tiles - 1 own whole tiles; each later group of `splits` programs shares one tile over K
    pid = gl.program_id(0)
    in_split = pid >= full_tiles
    r = gl.maximum(pid - full_tiles, 0)
    tile = gl.where(in_split, full_tiles + r // splits, pid)
    sp = gl.where(in_split, r % splits, 0)
    kb0 = sp * kb_per_split
    num_kb = gl.where(in_split, gl.minimum(kb_per_split, total_kb - kb0), total_kb)

    num_pid_n = gl.cdiv(N, BLOCK_N)  # grouped order: GROUP_M token tiles take each weight tile in turn
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    rows_m = gl.minimum(gl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    m0 = (first_m + (tile % width) % rows_m) * BLOCK_M
    n0 = ((tile % width) // rows_m) * BLOCK_N

    x_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, 128], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):  # prologue: blocks 0 .. STAGES - 1 in flight
        _refill(i, x_desc, w_desc, x_smem, w_smem, bars, m0, n0, kb0, num_kb, STAGES)

    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_L))
    sa_g = sa_ptr + kb0 * stride_sak  # this CTA's blocks start at kb0
    sb_g = sb_ptr + (n0 // 128) * stride_sbn + kb0 * stride_sbk
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC_L)
    if OVERLAP:  # blocks in pairs: both wgmmas issued, the first promoted while the second runs
        t0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC_L)
        t1 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC_L)
        g0 = _scales(sa_g, sb_g, 0, offs_m, M, stride_sam, stride_sak, stride_sbk)
        g1 = _scales(sa_g, sb_g, gl.minimum(1, num_kb - 1), offs_m, M, stride_sam, stride_sak, stride_sbk)
        for kb in range(0, num_kb - 1, 2):
            f0 = g0  # (this pair's scales, loaded a pair ahead)
            f1 = g1
            g0 = _scales(sa_g, sb_g, gl.minimum(kb + 2, num_kb - 1), offs_m, M, stride_sam, stride_sak, stride_sbk)
            g1 = _scales(sa_g, sb_g, gl.minimum(kb + 3, num_kb - 1), offs_m, M, stride_sam, stride_sak, stride_sbk)
            tok0 = _issue(kb, t0, x_smem, w_smem, bars, STAGES)
            tok1 = _issue(kb + 1, t1, x_smem, w_smem, bars, STAGES)
            t0 = warpgroup_mma_wait(num_outstanding=1, deps=(tok0,))
            acc = acc + t0 * f0[:, None]
            t1 = warpgroup_mma_wait(num_outstanding=0, deps=(tok1,))
            gl.thread_barrier()  # both blocks' wgmmas retired in every warpgroup: their stages take the next two
            _refill(kb + STAGES, x_desc, w_desc, x_smem, w_smem, bars, m0, n0, kb0, num_kb, STAGES)
            _refill(kb + 1 + STAGES, x_desc, w_desc, x_smem, w_smem, bars, m0, n0, kb0, num_kb, STAGES)
            acc = acc + t1 * f1[:, None]
        if num_kb % 2 == 1:
            f_last = _scales(sa_g, sb_g, num_kb - 1, offs_m, M, stride_sam, stride_sak, stride_sbk)
            tok = _issue(num_kb - 1, t0, x_smem, w_smem, bars, STAGES)
            r0 = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
            acc = acc + r0 * f_last[:, None]
    else:  # one partial: wgmma, wait, promote
        t = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC_L)
        for kb in range(0, num_kb):
            f = _scales(sa_g, sb_g, kb, offs_m, M, stride_sam, stride_sak, stride_sbk)
            tok = _issue(kb, t, x_smem, w_smem, bars, STAGES)
            t = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
            gl.thread_barrier()  # every warpgroup's wgmma kb retired: its stage takes block kb + STAGES
            _refill(kb + STAGES, x_desc, w_desc, x_smem, w_smem, bars, m0, n0, kb0, num_kb, STAGES)
            acc = acc + t * f[:, None]
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    if SPLIT:
        if in_split:
            st_id = tile - full_tiles
            _finish_split(acc, ws_ptr, lock_ptr + st_id, st_id, (gl.num_programs(0) - full_tiles) // splits, sp,
                          splits, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M, BLOCK_N, ACC_L, OUT_L)
        else:
            _store(acc, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M, BLOCK_N, OUT_L)
    else:
        _store(acc, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M, BLOCK_N, OUT_L)


@gluon.jit
def _ws_load(x_desc, w_desc, x_smem, w_smem, ready, empty, m0, n0, kb0, num_kb, STAGES: gl.constexpr,
             HALF: gl.constexpr):
    """Producer warp: K-block kb's two 64-token halves of x and the weight tile into stage kb % STAGES once both
    consumers released it (empty, count 2; the first pass through the ring waits on the opposite parity: free)."""
    NBYTES: gl.constexpr = 2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes
    for kb in range(0, num_kb):
        st = kb % STAGES
        mbarrier.wait(empty.index(st), ((kb // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(st), NBYTES)
        k = (kb0 + kb) * 128
        tma.async_copy_global_to_shared(x_desc, [m0, k], ready.index(st), x_smem.index(2 * st))
        tma.async_copy_global_to_shared(x_desc, [m0 + HALF, k], ready.index(st), x_smem.index(2 * st + 1))
        tma.async_copy_global_to_shared(w_desc, [n0, k], ready.index(st), w_smem.index(st))


@gluon.jit
def _ws_math(c: gl.constexpr, x_smem, w_smem, ready, empty, sa_ptr, sb_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N,
             stride_ym, stride_sam, stride_sak, stride_sbn, stride_sbk, m0, n0, kb0, num_kb, in_split, st_id,
             n_split_tiles, sp, splits, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr,
             STAGES: gl.constexpr, SPLIT: gl.constexpr):
    """Consumer warpgroup c: tokens m0 + c * HALF .. + HALF of the tile; per K-block wgmma, wait, release the stage,
    promote. The two consumers are not synchronized with each other, so one promotes while the other's wgmma runs."""
    ACC_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_N, 32])
    OUT_L: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    mh = m0 + c * HALF
    offs_m = mh + gl.arange(0, HALF, layout=gl.SliceLayout(1, ACC_L))
    sa_g = sa_ptr + kb0 * stride_sak
    sb_g = sb_ptr + (n0 // 128) * stride_sbn + kb0 * stride_sbk
    acc = gl.zeros([HALF, BLOCK_N], gl.float32, ACC_L)
    t = gl.zeros([HALF, BLOCK_N], gl.float32, ACC_L)
    f = _scales(sa_g, sb_g, 0, offs_m, M, stride_sam, stride_sak, stride_sbk)
    for kb in range(0, num_kb):
        st = kb % STAGES
        # the next block's scales load a whole block ahead (global loads: their latency stalled the promotion)
        f_next = _scales(sa_g, sb_g, gl.minimum(kb + 1, num_kb - 1), offs_m, M, stride_sam, stride_sak, stride_sbk)
        mbarrier.wait(ready.index(st), (kb // STAGES) & 1)
        tok = warpgroup_mma(x_smem.index(2 * st + c), w_smem.index(st).permute((1, 0)), t, use_acc=False,
                            is_async=True)
        t = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        mbarrier.arrive(empty.index(st), count=1)
        acc = acc + t * f[:, None]
        f = f_next
    if SPLIT:
        if in_split:  # each half of a split tile is its own piece set: ticket and slots 2 * st_id + c
            _finish_split(acc, ws_ptr, lock_ptr + 2 * st_id + c, 2 * st_id + c, 2 * n_split_tiles, sp, splits,
                          bias_ptr, y_ptr, M, N, stride_ym, mh, n0, HAS_BIAS, HALF, BLOCK_N, ACC_L, OUT_L)
        else:
            _store(acc, bias_ptr, y_ptr, M, N, stride_ym, mh, n0, HAS_BIAS, HALF, BLOCK_N, OUT_L)
    else:
        _store(acc, bias_ptr, y_ptr, M, N, stride_ym, mh, n0, HAS_BIAS, HALF, BLOCK_N, OUT_L)


@gluon.jit
def fp8_ws_kernel(x_desc, w_desc, sa_ptr, sb_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, stride_sam,
                  stride_sak, stride_sbn, stride_sbk, total_kb, kb_per_split, full_tiles, splits,
                  HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr,
                  STAGES: gl.constexpr, SPLIT: gl.constexpr, MATH_REGS: gl.constexpr):
    """Warp-specialized: a TMA producer warp and two consumer warpgroups (the default partition and a worker) with
    ready / empty mbarrier rings; tiles, tail split and scales as fp8_wgmma_kernel (x in two 64-token halves)."""
    HALF: gl.constexpr = BLOCK_M // 2
    pid = gl.program_id(0)
    in_split = pid >= full_tiles
    r = gl.maximum(pid - full_tiles, 0)
    tile = gl.where(in_split, full_tiles + r // splits, pid)
    sp = gl.where(in_split, r % splits, 0)
    kb0 = sp * kb_per_split
    num_kb = gl.where(in_split, gl.minimum(kb_per_split, total_kb - kb0), total_kb)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    rows_m = gl.minimum(gl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    m0 = (first_m + (tile % width) % rows_m) * BLOCK_M
    n0 = ((tile % width) // rows_m) * BLOCK_N
    st_id = tile - full_tiles
    n_split_tiles = (gl.num_programs(0) - full_tiles) // splits

    x_smem = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, HALF, 128], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    # (argument tuples written out: `+` on tuples in a kernel drops the constexpr-ness warp_specialize needs)
    gl.warp_specialize([
        (_ws_math, (0, x_smem, w_smem, ready, empty, sa_ptr, sb_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N,
                    stride_ym, stride_sam, stride_sak, stride_sbn, stride_sbk, m0, n0, kb0, num_kb, in_split, st_id,
                    n_split_tiles, sp, splits, HAS_BIAS, BLOCK_N, HALF, STAGES, SPLIT)),
        (_ws_math, (1, x_smem, w_smem, ready, empty, sa_ptr, sb_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N,
                    stride_ym, stride_sam, stride_sak, stride_sbn, stride_sbk, m0, n0, kb0, num_kb, in_split, st_id,
                    n_split_tiles, sp, splits, HAS_BIAS, BLOCK_N, HALF, STAGES, SPLIT)),
        (_ws_load, (x_desc, w_desc, x_smem, w_smem, ready, empty, m0, n0, kb0, num_kb, STAGES, HALF))],
        [4, 1], [MATH_REGS, 40])


def fp8_wgmma_ok(xq: torch.Tensor, weight: torch.Tensor, cublas_grid: bool) -> bool:
    """sm90, 128-row weight blocks aligned to the fused rows, TMA-able rows (16-byte strides)."""
    return (xq.is_cuda and torch.cuda.get_device_capability(xq.device)[0] == 9 and cublas_grid
            and weight.shape[1] % 16 == 0 and xq.stride(1) == 1 and xq.stride(0) % 16 == 0
            and weight.stride(1) == 1 and weight.stride(0) % 16 == 0)


def fp8_wgmma_gemm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, grid: torch.Tensor, locks: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                   config: dict | None = None) -> torch.Tensor:
    """y [M, N] = (xq, xs) @ (weight, grid)^T (+ bias); the caller checks fp8_wgmma_ok. config: DEFAULT_CONFIG's keys
    (BLOCK_N 128 weight rows = one scale block; BLOCK_M 64 tokens per warpgroup; TAIL_SPLIT: w4a16_wgmma.tail_split;
    OVERLAP: two partials, the next block's wgmma during a promotion - ptxas serializes its wgmmas, C7514)."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    m, k = xq.shape
    n = weight.shape[0]
    bn, bm = cfg["BLOCK_N"], cfg["BLOCK_M"]
    if bn != 128 or bm not in (64, 128) or (bm != 16 * cfg["num_warps"] and not cfg.get("WS")) or (
            cfg.get("WS") and bm != 128):
        raise ValueError(f"fp8_wgmma_gemm: tiles {bm} x {bn} on {cfg['num_warps']} warps are not supported; supported: "
                         f"BLOCK_N 128 (the weight scale blocks), BLOCK_M 64 / 128 on 4 / 8 warps (64 tokens per "
                         f"warpgroup)")
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    ws_mode = bool(cfg.get("WS", False))
    bx = bm // 2 if ws_mode else bm  # warp-specialized: x arrives in two 64-token halves, one per consumer
    x_layout = gl.NVMMASharedLayout.get_default_for([bx, BLOCK_K], gl.float8e4nv)
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, BLOCK_K], gl.float8e4nv)
    x_desc = TensorDescriptor.from_tensor(xq, [bx, BLOCK_K], x_layout)
    w_desc = TensorDescriptor.from_tensor(weight, [bn, BLOCK_K], w_layout)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    num_kb = triton.cdiv(k, BLOCK_K)
    if "ctas_per_sm" not in cfg:  # (64-token tiles on one warpgroup: two CTAs share an SM, ~96 KB and 154 registers)
        cfg["ctas_per_sm"] = 2 if bm <= 64 and cfg["num_warps"] == 4 and cfg["num_stages"] <= 4 else 1
    full, split = tail_split(tiles, num_kb, cfg, xq.device)
    if (tiles - full) * (2 if ws_mode else 1) > locks.numel():
        full, split = tiles, 1  # more split tiles than counters
    kb_per_split = triton.cdiv(num_kb, split)
    split = triton.cdiv(num_kb, kb_per_split)  # no empty splits
    if split == 1:
        full = tiles
    ws = torch.empty((split * (tiles - full) * bn * bm,), dtype=torch.float32, device=xq.device) if split > 1 else y
    if ws_mode:
        fp8_ws_kernel[(full + (tiles - full) * split,)](
            x_desc, w_desc, xs, grid, bias if bias is not None else y, y, ws, locks, m, n, y.stride(0), xs.stride(0),
            xs.stride(1), grid.stride(0), grid.stride(1), num_kb, kb_per_split, full, split,
            HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_M=bm, GROUP_M=cfg["GROUP_M"], STAGES=cfg["num_stages"],
            SPLIT=split > 1, MATH_REGS=cfg.get("MATH_REGS", 224), num_warps=4)
        return y
    fp8_wgmma_kernel[(full + (tiles - full) * split,)](
        x_desc, w_desc, xs, grid, bias if bias is not None else y, y, ws, locks, m, n, y.stride(0), xs.stride(0),
        xs.stride(1), grid.stride(0), grid.stride(1), num_kb, kb_per_split, full, split, HAS_BIAS=bias is not None,
        BLOCK_N=bn, BLOCK_M=bm, GROUP_M=cfg["GROUP_M"], STAGES=cfg["num_stages"], SPLIT=split > 1,
        OVERLAP=cfg["OVERLAP"], num_warps=cfg["num_warps"])
    return y
