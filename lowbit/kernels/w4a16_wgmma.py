"""w4a16 GEMM for large M on sm90, in Gluon: asynchronous wgmma overlapped with the int4 unpack.

    y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g(k)]) * s[n, g(k)]        (+ bias[n])

Why Gluon: in Triton 3.6 a tl.dot whose operand is computed in the loop is either waited on at once (operand
in shared memory) or, with the operand in registers (wgmma "RS"), assembled by ptxas with every wgmma
serialized (ptxas C7515; see triton-lang/triton#9433). Both leave the tensor cores idle during the unpack,
which capped the Triton kernels at ~450-530 TFLOP/s where cuBLAS bf16 reaches 650-750. Per K-block kb
(KB = 128 kernel columns in w4a16_layout.py's order), TMA keeping STAGES blocks of x and packed weights in flight:

    wait TMA(kb) -> q [BN, W] smem -> registers -> unpack (+ scale) -> A -> barrier -> refill a free stage
    -> wgmma(A, x_tile(kb)^T) async -> wait until <= 1 wgmma is in flight

RS = True: q is loaded in the wgmma A-fragment layout (words j, j+1 of a row are the 16-bit pair the fragment
holds), so the unpacked tile is the register operand as it stands; the loop is unrolled by two so the registers
being unpacked into are never those of the wgmma in flight. RS = False: A goes to a double-buffered shared
tile (SS wgmma; more shared-memory traffic). Block 0 is peeled: a zero-trip path to the final wait with
zero-filled accumulators behind an in-flight wgmma also makes ptxas serialize (C7515). "Swap AB" as in
w4a16.py: weight rows are the wgmma's M side (64 per warpgroup), tokens its N side (BM <= 256).
Split-K (SPLIT_K > 1, for grids with fewer tiles than SMs): CTA (tile, s) walks K-blocks s*KPS .. s*KPS + KPS - 1,
writes its fp32 partial to the workspace in the accumulator's own register layout (no conversion: each thread
re-reads the positions it wrote), and the tile's last CTA to arrive (atomic ticket in w.locks) sums the partials
in split order, so results are deterministic and CUDA-graph replays find the counters back at zero.
Tail split (TAIL_SPLIT, for grids of several waves): programs 0 .. full-1 take whole tiles; only the tiles of the
last partial wave are split over K the same way (tail_split), so that wave ends after 1/S of a tile instead of a
whole one with most SMs idle (ncu, H100, 25600x5120 at M = 1024, 800 tiles of 128x256 on 132 SMs: SMs active 85% of
the kernel without it; measured 464 -> 433 us).
Stream-K (STREAM_K, BLOCK_M <= 128, grids with fewer tiles than CTA slots: w4a16_streamk_kernel): program c takes
the units (tile, K-block) c * U .. c * U + U - 1 in tile-major order, at most two tiles, each through _segment;
cut tiles meet in the workspace as above. H100, 16 sweep shapes at M = 64..1024: faster than the tuned entry on two
points (5120x8192 M = 256: 60.0 -> 53.4 us; 8192x8192 M = 64: 28.5 -> 27.1 us), slower on most (4608x3584 M = 256:
29.5 vs 26.3 us): two pipeline fills per CTA and the fix-up cost more than the idle SMs they recover.
Stream-K on 128 x 256 tiles with one pipeline in a runtime loop over the CTA's tiles (not kept; H100, eleventh
session, 27 points at M = 256..1024, bench/results/h100.json w4a16_sk_loop_probe): it fits shared memory only on 2
stages (3 need 237592 B: the epilogue scratch can no longer alias the stages) and ran 1.6-2.9x slower than the
table's pick (5120x8192 M = 512: 135.1 vs 84.9 us); on 128 x 128 tiles the loop timed as the two-call form. With y
stored by TMA from a retired stage (no epilogue scratch) 3 stages fit, and 128 x 256 stream-K was still 1.2-3.2x
slower (40 points at M = 128..1024; 103.1 vs 83.1 us there; w4a16_sk_loop_tma_probe): the loop around the pipeline,
not the stage count, is what costs.
The epilogue as one TMA store of y's tile staged in the dead pipeline stages (not kept; H100, eleventh session, the
table's 59 wgmma points at M = 128..1024, bench/results/h100.json w4a16_tma_y_probe): bit-equal, 0.94-1.06x the
convert_layout + masked-store epilogue, median 1.00. Where the time goes against cuBLAS (ncu, H100, 5120x8192 at
M = 4096, 128 x 256 tiles with tail split vs cuBLAS's nvjet 320x128 kernel, a persistent 2x1-cluster grid): tensor pipe
busy 80.4 vs 92.3% of the elapsed cycles (559.8 vs 492.9 us under ncu's clocks), L2 throughput 48% of peak for both,
so the gap is tensor-pipe idle time, not L2 bandwidth. Timing against K (M = 512, 80 tiles on 80 SMs) puts 3-6 us
per tile outside the K loop; with all 132 SMs busy (M = 4096) a tile's K loop runs 17% slower per SM than with 80.
Split-K on one-wave grids (H100, fourth session, 10 points from 4608x3584 to 18944x3584 at M = 256 / 512, five tile
shapes): SPLIT_K 2 / 3 lost everywhere, e.g. 3584x3584 M = 512 on 128 x 128 tiles 26.9 -> 45.1 / 50.9 us (cuBLAS
19.1). ncu: those tiles hold one CTA per SM (163.9 KB of shared memory; 147.5 KB for 64 x 128 on 4 stages), so 224
split CTAs run as two waves of half tiles, no shorter than one wave of whole ones, and the fix-up comes on top; a
busy SM computes 4.4 TFLOP/s there, cuBLAS 5.2 on each of the 132. _slots counts the CTAs shared memory admits.
Two CTAs per SM instead (64 x 128 tiles on 3 stages, 112 KB each; plain, tail split or stream-K; 19 points at
M = 128..1024): slower than the table's pick on all 19, e.g. 3584x3584 M = 512 29.6 vs 26.5 us, 5120x8192 M = 512
96.7 vs 83.2 us; 64 x 256 tiles on one warpgroup were slower still.
Tried and not kept (H100, 2026-11-26): moving the stage refill after the wgmma wait (a barrier there instead of
before the wgmma: refills STAGES - 1 blocks ahead) was slower on most shapes (10240x5120 M = 512: 103 -> 134 us);
a Gluon warp_specialize version (a TMA producer warp, two independent consumer warpgroups, mbarrier ready/empty
rings) computed the same results but ran 30-40% slower: its 384 threads cap ptxas at 168 registers for all of the
code whatever setmaxnreg hands the consumers at run time, and ptxas serializes the wgmmas (C7512); loading the
group scales two blocks ahead instead of one (ncu put 7% of the stall samples on the unpack waiting for them):
-4.5% to +3.5% over 21 points of six shapes, within noise on most. With
BLOCK_N = 64 (one warpgroup, ~165 registers) two CTAs share an SM: 12-20% faster than BLOCK_N = 128 on the small
H100 shapes at M = 128..256.

| tensor  | dtype          | shape            | notes                                                      |
|---------|----------------|------------------|------------------------------------------------------------|
| x       | fp16 / bf16    | [M, K]           | any strides (copied to 16-byte aligned rows when needed)   |
| qweight | int32          | [Kp/KB * N, W]   | w4a16_layout.py's [Kp/KB, N, W] seen as 2-D                |
| scales  | fp16/bf16/fp32 | [Kp/Gk, N]       | Gk a multiple of KB, or 0 (per-channel: scaled in the epilogue) |
| zeros   | uint8          | [Kp/Gk, N]       | optional                                                   |
| y       | x.dtype        | [M, N]           |                                                            |
| ws      | fp32           | [S, split tiles, BN*BM] | split-K partials (S > 1)                            |
| locks   | int32          | [>= split tiles] | split-K tile counters, zero between launches              |
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from lowbit.kernels.w4a16 import _unpack_asm
from lowbit.kernels.w4a16_layout import W4A16Weights
from lowbit.kernels.w4a16_tma import tma_input
from lowbit.kernels.w4a16_tune import num_sms

TAIL_MIN_KB = 4  # a split tile's pieces walk at least this many K-blocks (each writes a BN x BM fp32 partial)
SK_MIN_KB = 4  # stream-K: K-blocks per CTA at least
SMEM_PER_SM = 228 * 1024  # sm90 (H100 / H200) shared memory per SM
SK_MAX_BLOCK_M = 128  # stream-K's two inlined tile pipelines: at BLOCK_M = 256 ptxas serializes the wgmmas (C7512)

# same PTX as w4a16.py: index 8 * scaled + 4 * bf16 + pair
_ASM = gl.constexpr(tuple(_unpack_asm(j, b, s) for s in (False, True) for b in (False, True) for j in range(4)))


@gluon.jit
def _pair(q, ce, co, s, j: gl.constexpr, SCALED: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr):
    """Chunks 2j, 2j+1 of the word tile q [BN, W] as DT tiles (q - z) [* s]."""
    if SCALED:
        w0, w1 = gl.inline_asm_elementwise(_ASM[8 + 4 * BF16 + j], "=r,=r,r,r,r,r,r", [q, ce, co, s],
                                           dtype=(ce.dtype, ce.dtype), is_pure=True, pack=2)
    else:
        w0, w1 = gl.inline_asm_elementwise(_ASM[4 * BF16 + j], "=r,=r,r,r,r,r", [q, ce, co], dtype=(ce.dtype, ce.dtype),
                                           is_pure=True, pack=2)
    return w0, w1


@gluon.jit
def _cat(a, b):
    """[BN, w] | [BN, w] -> [BN, 2w] along K."""
    return gl.reshape(gl.permute(gl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@gluon.jit
def _unpack(q, ce, co, s, SCALED: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr):
    """q [BN, W] -> the [BN, 8W] 16-bit operand, chunk i in columns i*W .. i*W + W - 1."""
    w0, w1 = _pair(q, ce, co, s, 0, SCALED, BF16, DT)
    w2, w3 = _pair(q, ce, co, s, 1, SCALED, BF16, DT)
    w4, w5 = _pair(q, ce, co, s, 2, SCALED, BF16, DT)
    w6, w7 = _pair(q, ce, co, s, 3, SCALED, BF16, DT)
    return _cat(_cat(_cat(w0, w1), _cat(w2, w3)), _cat(_cat(w4, w5), _cat(w6, w7)))


@gluon.jit
def _consts(s_ptr, z_ptr, g, offs_n, N, HAS_ZEROS: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr,
            BLOCK_N: gl.constexpr, W: gl.constexpr, QL: gl.constexpr):
    """[BN, W] tiles of the scale and the unpack's zero terms (see w4a16._consts) for group g."""
    nmask = offs_n < N
    s = gl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(gl.float32)
    if HAS_ZEROS:
        z = gl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(gl.float32)
    else:
        z = gl.full([BLOCK_N], 8.0, gl.float32, gl.SliceLayout(1, QL))
    if BF16:
        ce = -128.0 - z
        co = ce
    else:
        ce = -1024.0 - z
        co = -64.0 - z
    zero = gl.zeros([BLOCK_N, W], gl.float32, QL)
    return ((s[:, None] + zero).to(DT), (ce[:, None] + zero).to(DT), (co[:, None] + zero).to(DT), s)


@gluon.jit
def _block(kb, acc, cs, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, offs_n, m0, n0, N, kb0, num_kb,
           GS: gl.constexpr, HAS_ZEROS: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr,
           W: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr, QL: gl.constexpr, ACC_L: gl.constexpr,
           RS: gl.constexpr):
    """K-block kb0 + kb (kb counts this CTA's blocks, num_kb of them): unpack (into A[kb % 2], or registers with RS),
    issue its wgmma, keep one in flight, refill."""
    ONE_GROUP: gl.constexpr = GS == 0
    st = kb % STAGES
    s_t, ce, co, s_v = cs
    if not ONE_GROUP:  # the next block's group constants load while this block computes
        cs = _consts(s_ptr, z_ptr, (kb0 + gl.minimum(kb + 1, num_kb - 1)) * KB // GS, offs_n, N, HAS_ZEROS, BF16, DT,
                     BLOCK_N, W, QL)
    mbarrier.wait(bars.index(st), (kb // STAGES) & 1)
    q = q_smem.index(st).load(QL)
    a = _unpack(q, ce, co, s_t, not ONE_GROUP, BF16, DT)  # [BN, KB]
    if RS:  # q was loaded in the operand layout, so the unpacked tile is the wgmma A fragment as it stands
        a_op = gl.convert_layout(a, gl.DotOperandLayout(0, ACC_L, 2), assert_trivial=True)
    else:
        a_op = a_smem.index(kb % 2)
        a_op.store(a)  # its previous reader, wgmma kb - 2, retired at this warpgroup's wait in block kb - 1
        fence_async_shared()
    gl.thread_barrier()  # all rows written; every warpgroup is past its wait of block kb - 1, so wgmma kb - 2
    # retired everywhere: with 3+ stages its stage takes block kb - 2 + STAGES here
    if STAGES > 2:
        _refill(kb - 2 + STAGES, kb >= 2, x_desc, q_desc, x_smem, q_smem, bars, m0, n0, N, kb0, num_kb, KB, STAGES)
    acc = warpgroup_mma(a_op, x_smem.index(st).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    if STAGES == 2:  # two stages (BM = 256 fills shared memory): wgmma kb - 1 retired everywhere after a barrier
        gl.thread_barrier()
        _refill(kb + 1, kb >= 1, x_desc, q_desc, x_smem, q_smem, bars, m0, n0, N, kb0, num_kb, KB, STAGES)
    return acc, cs


@gluon.jit
def _refill(nk, ok, x_desc, q_desc, x_smem, q_smem, bars, m0, n0, N, kb0, num_kb, KB: gl.constexpr,
            STAGES: gl.constexpr):
    """TMA of this CTA's K-block nk (global kb0 + nk: x tile, packed weights) into its stage, if ok and nk exists."""
    ok = ok & (nk < num_kb)
    sp = nk % STAGES
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + q_desc.block_type.nbytes
    mbarrier.expect(bars.index(sp), NBYTES, pred=ok)
    tma.async_copy_global_to_shared(x_desc, [m0, (kb0 + nk) * KB], bars.index(sp), x_smem.index(sp), pred=ok)
    tma.async_copy_global_to_shared(q_desc, [(kb0 + nk) * N + n0, 0], bars.index(sp), q_smem.index(sp), pred=ok)


@gluon.jit
def _segment(tile, kb0, num_kb, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, M, N, GS: gl.constexpr,
             HAS_ZEROS: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr,
             BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr, W: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr,
             QL: gl.constexpr, ACC_L: gl.constexpr, RS: gl.constexpr):
    """K-blocks kb0 .. kb0 + num_kb - 1 (num_kb >= 1) of output tile `tile` (grouped order): fresh stage barriers,
    the TMA prologue, the unpack + wgmma pipeline, all wgmmas retired. Returns (fp32 accumulator, per-channel scale
    of the last group, m0, n0)."""
    ONE_GROUP: gl.constexpr = GS == 0
    num_pid_n = gl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    rows_m = gl.minimum(gl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % rows_m
    pid_n = (tile % width) // rows_m
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + q_desc.block_type.nbytes
    for i in gl.static_range(STAGES):  # prologue: blocks 0 .. STAGES-1 in flight
        ok = i < num_kb
        mbarrier.expect(bars.index(i), NBYTES, pred=ok)
        tma.async_copy_global_to_shared(x_desc, [m0, (kb0 + i) * KB], bars.index(i), x_smem.index(i), pred=ok)
        tma.async_copy_global_to_shared(q_desc, [(kb0 + i) * N + n0, 0], bars.index(i), q_smem.index(i), pred=ok)

    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, QL))
    g0 = 0
    if not ONE_GROUP:
        g0 = kb0 * KB // GS
    cs = _consts(s_ptr, z_ptr, g0, offs_n, N, HAS_ZEROS, BF16, DT, BLOCK_N, W, QL)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC_L)
    # block 0 peeled: the loop may run zero times, and a path that reaches the final wait with zero-filled
    # accumulator registers behind an in-flight wgmma makes ptxas serialize every wgmma (C7515)
    acc, cs = _block(0, acc, cs, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, offs_n, m0, n0, N,
                     kb0, num_kb, GS, HAS_ZEROS, BF16, DT, BLOCK_N, W, KB, STAGES, QL, ACC_L, RS)
    if RS:  # unrolled by two: the A registers of the wgmma in flight are never the ones being unpacked into
        for kb in range(1, num_kb - 1, 2):
            acc, cs = _block(kb, acc, cs, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, offs_n, m0,
                             n0, N, kb0, num_kb, GS, HAS_ZEROS, BF16, DT, BLOCK_N, W, KB, STAGES, QL, ACC_L, RS)
            acc, cs = _block(kb + 1, acc, cs, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, offs_n, m0,
                             n0, N, kb0, num_kb, GS, HAS_ZEROS, BF16, DT, BLOCK_N, W, KB, STAGES, QL, ACC_L, RS)
        if num_kb % 2 == 0:
            acc, cs = _block(num_kb - 1, acc, cs, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, offs_n,
                             m0, n0, N, kb0, num_kb, GS, HAS_ZEROS, BF16, DT, BLOCK_N, W, KB, STAGES, QL, ACC_L, RS)
    else:
        for kb in range(1, num_kb):
            acc, cs = _block(kb, acc, cs, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, offs_n, m0,
                             n0, N, kb0, num_kb, GS, HAS_ZEROS, BF16, DT, BLOCK_N, W, KB, STAGES, QL, ACC_L, RS)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    return acc, cs[3], m0, n0


@gluon.jit
def w4a16_wgmma_kernel(x_desc, q_desc, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, total_kb,
                       kb_per_split, full_tiles, splits, GS: gl.constexpr, HAS_ZEROS: gl.constexpr,
                       HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr,
                       STAGES: gl.constexpr, RS: gl.constexpr, SPLIT: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    W: gl.constexpr = q_desc.block_type.shape[1]
    KB: gl.constexpr = 8 * W
    DT: gl.constexpr = x_desc.dtype
    BF16: gl.constexpr = DT == gl.bfloat16
    ONE_GROUP: gl.constexpr = GS == 0
    ACC_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    if RS:  # words j, j+1 of a row pair up as the 16-bit pairs of the wgmma A fragment (w4a16_layout.py's order)
        QL: gl.constexpr = gl.DotOperandLayout(0, ACC_L, 2)
    else:  # a thread holds 8 words (32 B) of one row: each chunk it unpacks is 16 contiguous bytes of A
        QL: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [NW, 1], [1, 0])
    OUT_L: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, NW], [0, 1])  # y^T: 4 contiguous n per thread
    A_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, KB], DT)

    # programs 0 .. full_tiles - 1 own whole tiles; each later group of `splits` programs shares one of the
    # remaining tiles, split over K (all of them when full_tiles = 0: plain split-K)
    pid = gl.program_id(0)
    in_split = pid >= full_tiles
    r = gl.maximum(pid - full_tiles, 0)
    tile = gl.where(in_split, full_tiles + r // splits, pid)
    sp = gl.where(in_split, r % splits, 0)
    kb0 = sp * kb_per_split  # this CTA walks K-blocks kb0 .. kb0 + num_kb - 1 (>= 1 of them)
    num_kb = gl.where(in_split, gl.minimum(kb_per_split, total_kb - kb0), total_kb)

    x_smem = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, KB], x_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, W], q_desc.layout)
    a_smem = x_smem  # unused with RS
    if not RS:
        a_smem = gl.allocate_shared_memory(DT, [2, BLOCK_N, KB], A_SL)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    acc, s_v, m0, n0 = _segment(tile, kb0, num_kb, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, M, N,
                                GS, HAS_ZEROS, BF16, DT, BLOCK_N, BLOCK_M, GROUP_M, W, KB, STAGES, QL, ACC_L, RS)
    if SPLIT:  # split tiles: fp32 partial -> workspace; the tile's last CTA to arrive sums them in split order
        if in_split:
            st_id = tile - full_tiles  # this tile among the split ones: partials [S, split tiles, BN, BM]
            _finish_split(acc, s_v, ws_ptr, lock_ptr + st_id, st_id, (gl.num_programs(0) - full_tiles) // splits, sp,
                          splits, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, ONE_GROUP, HAS_BIAS, BLOCK_N, BLOCK_M,
                          ACC_L, OUT_L)
        else:
            _epilogue(acc, s_v, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, ONE_GROUP, HAS_BIAS, BLOCK_N, BLOCK_M,
                      OUT_L)
    else:
        _epilogue(acc, s_v, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, ONE_GROUP, HAS_BIAS, BLOCK_N, BLOCK_M, OUT_L)


@gluon.jit
def _finish_split(acc, s_v, ws_ptr, lock, base, stride, piece, pieces, bias_ptr, y_ptr, M, N, stride_ym, m0, n0,
                  ONE_GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                  ACC_L: gl.constexpr, OUT_L: gl.constexpr):
    """Piece `piece` of a tile cut into `pieces` over K: its fp32 partial goes to workspace slot piece * stride + base,
    in the accumulator's own layout (each thread re-reads what it wrote, no conversion); the last piece to arrive
    (atomic ticket on `lock`) sums all of them in piece order - deterministic - and stores y, and resets the ticket
    to 0 for the next launch (and CUDA-graph replays)."""
    TILE: gl.constexpr = BLOCK_N * BLOCK_M
    loc = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC_L))[:, None] * BLOCK_M
           + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC_L))[None, :])
    gl.store(ws_ptr + (piece * stride + base).to(gl.int64) * TILE + loc, acc)
    gl.thread_barrier()  # every thread's partial is written before the release below
    arrived = gl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
    if arrived == pieces - 1:
        total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC_L)
        for p in range(0, pieces):  # its own partial re-read too: keeping it in registers beside the sum spilled
            total += gl.load(ws_ptr + (p * stride + base).to(gl.int64) * TILE + loc, cache_modifier=".cg")
        gl.atomic_xchg(lock, 0)
        _epilogue(total, s_v, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, ONE_GROUP, HAS_BIAS, BLOCK_N, BLOCK_M, OUT_L)


@gluon.jit
def _sk_tile(t, a, e, c, units_per_cta, total_kb, p_max, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr,
             bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, GS: gl.constexpr, HAS_ZEROS: gl.constexpr,
             HAS_BIAS: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr,
             BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr, W: gl.constexpr, KB: gl.constexpr, STAGES: gl.constexpr,
             QL: gl.constexpr, ACC_L: gl.constexpr, OUT_L: gl.constexpr, RS: gl.constexpr):
    """Stream-K: K-blocks a .. e - 1 of tile t, computed by program c; whole tiles store y, pieces go through the
    workspace [tiles, p_max, BN, BM] (piece index = c - the first program of the tile)."""
    acc, s_v, m0, n0 = _segment(t, a, e - a, x_desc, q_desc, x_smem, q_smem, a_smem, bars, s_ptr, z_ptr, M, N, GS,
                                HAS_ZEROS, BF16, DT, BLOCK_N, BLOCK_M, GROUP_M, W, KB, STAGES, QL, ACC_L, RS)
    first = (t * total_kb) // units_per_cta
    pieces = ((t + 1) * total_kb - 1) // units_per_cta - first + 1
    if pieces == 1:
        _epilogue(acc, s_v, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, GS == 0, HAS_BIAS, BLOCK_N, BLOCK_M, OUT_L)
    else:
        _finish_split(acc, s_v, ws_ptr, lock_ptr + t, t * p_max, 1, c - first, pieces, bias_ptr, y_ptr, M, N,
                      stride_ym, m0, n0, GS == 0, HAS_BIAS, BLOCK_N, BLOCK_M, ACC_L, OUT_L)


@gluon.jit
def w4a16_streamk_kernel(x_desc, q_desc, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, total_kb,
                         units_per_cta, total_units, p_max, GS: gl.constexpr, HAS_ZEROS: gl.constexpr,
                         HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr,
                         STAGES: gl.constexpr):
    """Stream-K for grids with fewer tiles than CTA slots: program c computes the units (tile, K-block) c * U ..
    c * U + U - 1 of all tiles' K-blocks in tile-major order (U <= total_kb: at most two tiles), so every SM streams
    the same amount of work; RS operand as w4a16_wgmma_kernel."""
    NW: gl.constexpr = gl.num_warps()
    W: gl.constexpr = q_desc.block_type.shape[1]
    KB: gl.constexpr = 8 * W
    DT: gl.constexpr = x_desc.dtype
    BF16: gl.constexpr = DT == gl.bfloat16
    ACC_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    QL: gl.constexpr = gl.DotOperandLayout(0, ACC_L, 2)
    OUT_L: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, NW], [0, 1])
    c = gl.program_id(0)
    u0 = c * units_per_cta
    u1 = gl.minimum(u0 + units_per_cta, total_units)
    t = u0 // total_kb
    a = u0 - t * total_kb
    e = gl.minimum(total_kb, u1 - t * total_kb)
    x_smem = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, KB], x_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, W], q_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    _sk_tile(t, a, e, c, units_per_cta, total_kb, p_max, x_desc, q_desc, x_smem, q_smem, x_smem, bars, s_ptr, z_ptr,
             bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, GS, HAS_ZEROS, HAS_BIAS, BF16, DT, BLOCK_N, BLOCK_M,
             GROUP_M, W, KB, STAGES, QL, ACC_L, OUT_L, True)
    if u1 > (t + 1) * total_kb:  # the range runs into the next tile
        gl.thread_barrier()  # every warp is done with the stages and barriers of the first tile
        _sk_tile(t + 1, 0, u1 - (t + 1) * total_kb, c, units_per_cta, total_kb, p_max, x_desc, q_desc, x_smem, q_smem,
                 x_smem, bars, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, GS, HAS_ZEROS,
                 HAS_BIAS, BF16, DT, BLOCK_N, BLOCK_M, GROUP_M, W, KB, STAGES, QL, ACC_L, OUT_L, True)


@gluon.jit
def _epilogue(acc, s_v, bias_ptr, y_ptr, M, N, stride_ym, m0, n0, ONE_GROUP: gl.constexpr, HAS_BIAS: gl.constexpr,
              BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, OUT_L: gl.constexpr):
    """y^T tile [BN, BM] (+ per-channel scale, bias) -> y [M, N]."""
    out = gl.convert_layout(acc, OUT_L)  # [BN, BM]
    offs_on = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT_L))
    offs_om = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, OUT_L))
    if ONE_GROUP:
        out = out * gl.convert_layout(s_v, gl.SliceLayout(1, OUT_L))[:, None]
    if HAS_BIAS:
        out = out + gl.load(bias_ptr + offs_on, mask=offs_on < N, other=0.0).to(gl.float32)[:, None]
    y_ptrs = y_ptr + offs_om[None, :].to(gl.int64) * stride_ym + offs_on[:, None]
    gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_on < N)[:, None] & (offs_om < M)[None, :])


def smem_bytes(cfg: dict, block_k: int = 128, words: int = 16) -> int:
    """Shared memory of one CTA: STAGES x (x tile + packed weight tile), the A tiles without RS, and ~4 KB of
    barriers and alignment (ncu, H100: 147.5 KB for 64 x 128 tiles / 4 stages, 163.9 KB for 128 x 128 / 4)."""
    stages = int(cfg.get("num_stages", 3))
    a = 0 if cfg.get("RS", False) else 2 * cfg["BLOCK_N"] * block_k * 2
    return stages * (cfg["BLOCK_M"] * block_k * 2 + cfg["BLOCK_N"] * words * 4) + a + 4096


def _slots(cfg: dict, device) -> int:
    """CTA slots of the GPU for this tile config: SMs x CTAs one SM holds. BLOCK_N = 64 (one warpgroup, <= 235
    registers) fits two where their shared memory does (SMEM_PER_SM, 1 KB reserved per CTA), else one: 64 x 128
    tiles on 4 stages take 147.5 KB, one per SM (ncu: block limit shared mem 1), so a grid of 224 of them runs in two
    waves; TAIL_SLOTS overrides it (tests)."""
    fits_two = cfg["BLOCK_N"] == 64 and 2 * (smem_bytes(cfg) + 1024) <= SMEM_PER_SM
    per_sm = int(cfg.get("ctas_per_sm", 2 if fits_two else 1))
    return int(cfg.get("TAIL_SLOTS", 0)) or num_sms(device) * per_sm


def tail_split(tiles: int, num_kb: int, cfg: dict, device) -> tuple[int, int]:
    """(full_tiles, splits): SPLIT_K > 1 splits every tile (tile-starved grids). Otherwise, with TAIL_SPLIT, the tiles
    of a last partial wave are split over K so that they fill it: e.g. 800 tiles on 132 one-CTA SMs are 6 waves
    and 8 tiles, a seventh wave 94% idle; with each of those 8 split 16 ways it lasts 1/16 of a tile (>= TAIL_MIN_KB
    K-blocks per split)."""
    split = max(1, min(int(cfg.get("SPLIT_K", 1)), num_kb))
    if split > 1:
        return 0, split
    if not cfg.get("TAIL_SPLIT", False):
        return tiles, 1
    slots = _slots(cfg, device)
    waves, rem = divmod(tiles, slots)
    if waves == 0 or rem == 0:
        return tiles, 1
    split = max(1, min(slots // rem, num_kb // TAIL_MIN_KB, int(cfg.get("TAIL_MAX", 16))))
    return (tiles - rem, split) if split > 1 else (tiles, 1)


def stream_k(tiles: int, num_kb: int, cfg: dict, device) -> tuple[int, int, int] | None:
    """(K-blocks per CTA U, CTAs, most pieces of one tile) for STREAM_K configs on grids with fewer tiles than CTA
    slots, else None: all tiles' K-blocks dealt out evenly (>= SK_MIN_KB each) over at most one wave of CTAs."""
    if (not cfg.get("STREAM_K") or not cfg.get("RS", False) or int(cfg.get("SPLIT_K", 1)) > 1
            or cfg["BLOCK_M"] > SK_MAX_BLOCK_M):
        return None
    slots = _slots(cfg, device)
    units = tiles * num_kb
    if tiles >= slots or units < 2 * SK_MIN_KB:
        return None
    ctas = max(tiles, min(slots, units // SK_MIN_KB))
    per = -(-units // ctas)
    return per, -(-units // per), -(-num_kb // per) + 1


def w4a16_wgmma_gemm(x2: torch.Tensor, w: W4A16Weights, bias: torch.Tensor | None, cfg: dict) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W^T (+ bias); cfg: BLOCK_N (64 per warpgroup), BLOCK_M, num_stages, GROUP_M, RS,
    SPLIT_K (> 1: a [S, tiles, BN, BM] fp32 workspace and the tile counters in w.locks; one stream per weight),
    TAIL_SPLIT (tail_split), STREAM_K (stream_k; a [tiles, p_max, BN, BM] workspace)."""
    m = x2.shape[0]
    x2 = tma_input(x2, w)
    y = torch.empty((m, w.n), dtype=x2.dtype, device=x2.device)
    bn, bm = cfg["BLOCK_N"], cfg["BLOCK_M"]
    gdt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    x_layout = gl.NVMMASharedLayout.get_default_for([bm, w.block_k], gdt)
    x_desc = TensorDescriptor.from_tensor(x2, [bm, w.block_k], x_layout)
    q_layout = gl.NVMMASharedLayout.get_default_for([bn, w.words], gl.int32)
    q_desc = TensorDescriptor.from_tensor(w.qweight.view(-1, w.words), [bn, w.words], q_layout)
    tiles = triton.cdiv(w.n, bn) * triton.cdiv(m, bm)
    num_kb = w.k_pad // w.block_k
    sk = stream_k(tiles, num_kb, cfg, x2.device) if tiles <= w.locks.numel() else None
    if sk is not None:
        units_per_cta, ctas, p_max = sk
        ws = torch.empty((tiles * p_max * bn * bm,), dtype=torch.float32, device=x2.device)
        w4a16_streamk_kernel[(ctas,)](
            x_desc, q_desc, w.scales, w.zeros if w.zeros is not None else w.scales, bias if bias is not None else y,
            y, ws, w.locks, m, w.n, y.stride(0), num_kb, units_per_cta, tiles * num_kb, p_max, GS=w.gk,
            HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_M=bm,
            GROUP_M=cfg.get("GROUP_M", 8), STAGES=cfg.get("num_stages", 3), num_warps=cfg.get("num_warps", 8))
        return y
    full, split = tail_split(tiles, num_kb, cfg, x2.device)
    if tiles - full > w.locks.numel():
        full, split = tiles, 1  # more split tiles than counters
    kb_per_split = triton.cdiv(num_kb, split)
    split = triton.cdiv(num_kb, kb_per_split)  # no empty splits
    if split == 1:
        full = tiles
    ws = torch.empty((split * (tiles - full) * bn * bm,), dtype=torch.float32, device=x2.device) if split > 1 else y
    w4a16_wgmma_kernel[(full + (tiles - full) * split,)](
        x_desc, q_desc, w.scales, w.zeros if w.zeros is not None else w.scales, bias if bias is not None else y, y,
        ws, w.locks, m, w.n, y.stride(0), num_kb, kb_per_split, full, split, GS=w.gk, HAS_ZEROS=w.zeros is not None,
        HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_M=bm, GROUP_M=cfg.get("GROUP_M", 8),
        STAGES=cfg.get("num_stages", 3), RS=cfg.get("RS", False), SPLIT=split > 1, num_warps=cfg.get("num_warps", 8))
    return y
