"""w4a8: int4 group-wise weights (G = 128, symmetric) x fp8 e4m3 activations (sm89+).

    y[m, n] = sum_g (xq[m, g] @ (q[n, g] - 8)^T) * sx[m, g] * scale[n, g] (+ bias),   fp32 accumulation
with xq, sx = reference.quantize_fp8_ref(x * pre_quant_scale?, granularity): tensor_static (W4A8-AWQ: one
input_scale, max'ed over fused shards by the caller), token_group 128 (DeepSeek W4AFP8), tensor_dynamic, token.

| tensor  | canonical (lowbit/scheme.py)            | W4A8Weights.w16 (w4a16_layout.py)                     |
|---------|-----------------------------------------|-------------------------------------------------------|
| qweight | int32 [N, ceil(K/8)], LSB-first along K | int32 [Kp/128, N, 16]: bits 4i of word j = column 16i + j |
| scales  | fp16/bf16/fp32 [N, ceil(K/128)]         | [Kp/128, N] group-major (16-bit where exact)          |

Candidates (`pick_candidate`; M thresholds in configs/w4a8_select.json, measured by bench/kernels/w4a8.py):
| name           | path                                                                                   |
|----------------|----------------------------------------------------------------------------------------|
| fused          | the w4a16 decode kernel in fp8-activation mode (w4a16_fp8act.w4a16_gemm_fp8act): int4 unpacked  |
|                | in registers, x quantized on its load (static / token_group; token and tensor_dynamic   |
|                | take quantize_fp8 first), exact fp16 MMAs, w4a16's tuned split-K tiles; M <= 64.        |
|                | In-kernel codes: e4m3(x * RN(1 / s)) (fused_exact false: one e4m3 step off the          |
|                | reference where x / s is within an fp32 ulp of a tie, ~0.06% of token_group codes of    |
|                | randn x); token_group at M in fused_wide8 on 128-row tiles of 8 warps (x quantized once  |
|                | per 128 weight rows, the 64-row tiles' split-K)                                         |
| fused_pre      | the same kernel on x quantized first by quantize_fp8 (e4m3_row / e4m3_group modes): no  |
|                | per-tile quantization (token_group's row amax is a reduction in every weight tile);     |
|                | static / token_group in the M range fused_pre["NxK"][granularity] measured per shape     |
| dequant_cublas | int4 -> e4m3 weight scratch [N, Kp] (one pass), quantize_fp8, then cuBLAS F.scaled_mm   |
|                | BlockWise1x128 x BlockWise1x128 (K % 128 == 0, N % 16 == 0, M >= 16); per-tensor /     |
|                | per-token activation scales enter as constant 1 x 128 block scales (the same math)      |
| dequant_cublas_x128 | per-tensor activation scales (tensor_static / tensor_dynamic) only: the same scratch, |
|                | the one x scale as a constant BlockWise128x128 grid x the 1 x 128 weight scales: cuBLAS |
|                | runs its 128x128-block kernel (Avec128_Bblk128) instead of the 1x128 x 1x128 one (H100, |
|                | 7168x16384: 354 vs 447 us at M = 2048); M ranges x128[NxK] measured, else x128_default |
| dequant        | the same scratch, then the Triton fp8 block GEMM with 1 x 128 weight scales (fallback)  |
| w16            | x fake-quantized in one pass (quant_act.fake_quantize_act_fp8: xq * sx in x.dtype),     |
|                | then w4a16_gemm on the same int4 weights (its tuned decode / wgmma / dequant paths):    |
|                | 16-bit MMAs on the fp8 values; 16-bit x and output only. Per shape and activation       |
|                | granularity in the M range w16[NxK][granularity] measured (else w16_default)           |
Tried for large M and not kept (H100, CUDA-graph replay, token_group x, 2026-11-26): a Triton 3.6 GEMM that turns
each int4 weight tile into e4m3 in registers (shift/mask, int -> fp16 -> e4m3) and feeds fp8 wgmma, with the
tile through shared memory or as the MMA's register operand (swap AB), tiles 64..256: 7168x16384 at M = 2048 took
1394-2636 us against 552 us for dequant_cublas and 336 us for per-tensor cuBLAS fp8 (2112x7168: 200 vs 90 us);
the per-element conversions and the tile shuffles dominate. dequant (Triton block GEMM on the scratch) measured
851 us there, so cuBLAS stays the large-M path.
Also not kept (H100, 2026-11-26, third session): fused_pre with the GEMM launched as a programmatic dependent (PDL)
of quantize_fp8, prefetching its first weight blocks to L2 before griddepcontrol.wait: -0.8 to +2.8 us against the
plain launch at M = 1..64 on the four quick shapes (prefetching 4 blocks was slower than none).
Also not kept (H100, fourth session, M = 1..16, bf16 x, four quick shapes; a throwaway sweep of w4a16_gemm_fp8act
configs timed as bench/kernels/w4a8.py does, each against w4a16 in the same run): the exact-division fix-up and the
clamp in the in-kernel quantization (cvt.rn.satfinite saturates by itself): static 13.3-13.7 us with both vs
11.8-13.0 without the clamp vs 11.2-11.6 with neither (4096x7168, w4a16 10.8-11.7), 39.8-40.5 / 33.9-37.7 / 30.5-31.5
us (7168x16384, w4a16 28.4-29.5); the M = 1 row skip with the multiply-only quantization (static 12.1 vs 11.2 us,
token_group 14.3 vs 13.0, 4096x7168); zero-padding M = 2..8 rows the same way (static 17.4-26.8 vs 11.2 us);
in-kernel fake quantization for token_group (xq * s rounded to x.dtype as the operand of the 16-bit MMA in x.dtype,
no per-group activation scale on the partial: bit-equal to w16 on its config): 13.6-14.1 vs 12.9-13.3 us (4096x7168),
42.2-44.1 vs 38.3-39.0 (7168x16384); other tiles for token_group (4096x7168 M = 1..16, against 12.2-13.1 us on 128
rows / 8 warps): 128 rows on 4 warps 13.6-14.5, 256 rows on 8 warps 14.8-15.6, 128 / 256 rows with split-K doubled
15.6-16.5 / 18.2-20.9, 2 / 4 / 5 stages 13.8-14.5 / 12.9-13.7 / 13.2-14.3, 64 rows on 8 warps 17.5-22.4, the M = 1
row skip on them 14.2 vs 12.2; for static, 128 rows / 8 warps 12.8-13.5, with split-K doubled 15.8-17.1, 2 / 4 stages
12.4-12.8 / 11.9-12.4 vs 11.1-12.2 us on the 64-row tiles.
dequant_cublas_x128 (fifth session, H100, interleaved timing; bench/results/h100.json w4a8_gemm_x128_sweep): against the
1x128-scaled x, 1.03-1.47x faster from M = 256..512 on 13 of 14 shapes (7168x16384 M = 8192: 1748 vs 2334 us), slower
at M = 64..128 (4096x7168 M = 64: 45.7 vs 36.2 us) and on 2112x7168 up to M = 2048 (cuBLAS picks other tiles there);
static at M = 8192 went from 1.09-1.29x to 1.18-1.52x bf16 cuBLAS on the four quick shapes.
w16 / fused_pre ranges for all 14 sweep shapes (sixth session, H100, python -m bench.kernels.w4a8 select: every
candidate timed against the others, interleaved, at M = 1..1024; bench/results/h100.json w4a8_select*): before, only
the four quick shapes had measured ranges and the others took dequant_cublas from M = 129, whose cuBLAS 1x128 x
1x128 GEMM is slow at mid M (5120x25600 M = 256: 218.6 us, w16 127.5, bf16 110); w16 now serves M = 32..256-1024 on
every shape but 2112x7168 (dequant_cublas from 128) and token_group decode (M = 1..16) on 8 shapes where the in-kernel
quantization of the fused path cost more (51200x5120: 0.66 -> 0.94x w4a16; 5120x25600 0.65 -> 0.89x).
Also not kept (H100, seventh session, static x, a throwaway probe): cuBLAS block-scaled with the operands swapped,
y^T = W x^T (W's 1 x 128 scales on A, x's constant 128x128 grid on B): the same time as dequant_cublas_x128's GEMM
(4096x7168 M = 8192: 428.7 vs 426.3 us; 64-94% of per-tensor fp8 either way over the 14 shapes), and y^T then needs a
transpose (+19-640%). Where static time goes at M = 8192 (4096x4096): the x128 GEMM 245 us, int4 -> e4m3 scratch
9.7, quantizing x ~35-45 (the pass of its own), against 216 for per-tensor fp8 on e4m3 x and 390 for bf16.
Seventh session (H100): w16 runs w4a16_gemm, whose table had no entry for the six DeepSeek-V3 shapes and 51200x5120
(the heuristic served them: 2112x7168 M = 256 took 39.9 us, bf16 19.3). With those shapes tuned (python -m
bench.kernels.w4a16 --tune --shapes ...) and their ranges re-selected, w4a8 token_group x bf16 at M = 64 / 256:
2112x7168 0.77 -> 0.94 / 0.66 -> 0.68, 7168x2048 0.74 -> 0.93 / 0.55 -> 0.71, 4096x7168 1.27 -> 1.29 / 0.65 -> 0.80,
24576x1536 1.81 -> 1.83 / 0.66 -> 0.80 (bench/results/h100.json w4a8_gemm). The select pass now times the in-kernel
fused path at every M <= 64: before, once w16 held an M <= 16 range, fused was no longer timed there and could not win
it back (a first re-select moved 2112x7168 token_group M = 1..16 to w16 at 0.76x w4a16 where fused gives 0.88x).
x quantized by its producer (eighth session, H100, bench/kernels/w4a8.py gemm_us columns, bench/results/h100.json
w4a8_gemm_prequantized): the models fuse the add + RMSNorm before qkv_proj / gate_up_proj (kernels/norm.py) and,
from 256 tokens on, the SiLU-mul before down_proj into x's quantization, so these GEMMs get e4m3 x (or, in w16 ranges,
the fake-quantized bf16 x) and no separate quantization pass; o_proj's input (the attention output) still takes one.
The GEMM alone x bf16 at M >= 2048, 14 shapes: static 1.06-1.72
(>= 1.5 on 9 of 28 points, 3 with the quantization pass timed in), token_group 0.90-1.27.
At M <= 16 the weight stream is the same int4 bytes as w4a16's, so w4a8 can tie w4a16 at best; quantizing x costs
a launch (fused_pre, w16) or per-tile work (fused). w4a16_us / w4a8 us at M = 1..16 on the four quick shapes (python -m
bench.kernels w4a8 --quick --ms 1,2,4,8,16, H100, fourth session): token_group 0.85-0.90x (was 0.69-0.90x), static
0.92-0.97x (was 0.81-0.94x).
At decode sizes the models now hand w4a8 the same way (ninth session, producer_candidate): where pick_candidate takes
fused / fused_pre / w16 and x and the output are 16-bit, the norm (qkv_proj, gate_up_proj) or the SiLU-mul (down_proj)
writes x fake-quantized and the GEMM is w4a16's; only o_proj (x from attention) still quantizes in-kernel. python -m
bench.kernels.w4a8 decode (H100, 55d814c, four quick shapes, M = 1..16, bench/results/h100.json w4a8_decode_layers),
w4a16 layer time / w4a8 layer time, static / token_group: norm + projection 0.93-0.97 / 0.92-0.96 (the quantizing
norm at M = 1 / 16 2.5-3.6 us, the 16-bit one 2.3-3.0, act_quant), SiLU-mul + down_proj 0.96-1.00 / 0.96-1.00 (both
one Triton pass, kernels/activation.py for w4a16), o_proj 0.93-0.96 / 0.85-0.92. The kernels alone with the
quantization timed in (w4a8_gemm_decode, 14 shapes): token_group 0.84-0.96, static 0.89-0.98 (before this session's
quantization launch shapes and w16 ranges: 0.77-0.96 / 0.85-0.99 at 4f20c90, 0.78-0.94 / 0.85-0.98 at 0efe714).
Also not kept (H100, ninth session, a throwaway probe, bf16 x, interleaved with cuBLAS bf16): the int4 -> e4m3 scratch
in 2 / 4 / 8 N-chunks, a side stream converting chunk i + 1 while cuBLAS (the _scaled_mm_v2.out op into y's column
slice; outputs bit-equal) multiplies chunk i, as w4a16's dequant overlap: slower on 27 of 28 (shape, M, granularity)
points of seven shapes at M = 2048 / 8192, e.g. 4096x4096 static M = 2048 73.7 us on one chunk vs 78.8 / 89.6 / 156.3,
M = 8192 250.4 vs 262.4 / 288.3 / 300.9; the one gain 7168x16384 static M = 8192, 1747 -> 1678 us on 2 chunks. The
conversion takes SMs and bandwidth from the GEMM beside it, and the narrower GEMMs lose efficiency.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.kernels import fp8_block
from lowbit.kernels.fp8_gemm import _device_ok, _m_range, cublas_block_scaling, load_config
from lowbit.kernels.quant_act import GRANULARITIES, fake_quantize_act_fp8, quantize_fp8, silu_mul_quantize_fp8
from lowbit.kernels.w4a16 import W4A16Weights, w4a16_gemm, w4a16_repack
from lowbit.kernels.w4a16_fp8act import FP8_ACT_MAX_M, fp8act_config, w4a16_gemm_fp8act

GROUP_SIZE = 128
CANDIDATES = ("fused", "fused_pre", "dequant", "dequant_cublas", "dequant_cublas_x128", "w16")
_DEFAULT_SELECT = {"fused_max_m": 16, "dequant_cublas_min_m": 17, "fused_wide_min_m": 65, "fused_row_skip": False,
                   "fused_exact": False, "fused_wide8": {}, "fused_pre": {}, "w16": {}, "w16_default": None,
                   "x128": {}, "x128_default": None}
_PER_TENSOR = ("tensor_static", "tensor_dynamic")  # one activation scale: dequant_cublas_x128 applies
WIDE_BLOCK_N = 128  # fused from M = fused_wide_min_m: 128-row weight tiles (half the in-kernel x quantization)
WIDE8 = {"BLOCK_N": 128, "num_warps": 8}  # fused_wide8 ranges: 128-row tiles on 8 warps, the 64-row tiles' split-K
CUBLAS_MIN_M = 16  # as fp8_gemm.CUBLAS_BLOCK_MIN_M (1 x 128 x 1 x 128 probed at M = 16, 32, 64, 128)
_FUSED_MODES = {"tensor_static": "static", "token_group": "token_group"}  # quantized in-kernel
W16_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class W4A8Weights:
    w16: W4A16Weights  # symmetric int4, G = 128, in the w4a16 kernel layout
    n: int
    k: int


@triton.jit
def int4_to_fp8_kernel(qw_ptr, out_ptr, N, stride_on, BLOCK_N: tl.constexpr):
    """w4a16 word tiles [Kp/128, N, 16] -> e4m3 q - 8 [N, Kp]: bitfield i of word j is column 16 i + j of block kb."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.program_id(1)
    offs_nc = tl.minimum(offs_n, N - 1)
    words = tl.load(qw_ptr + kb.to(tl.int64) * N * 16 + offs_nc[:, None] * 16 + tl.arange(0, 16)[None, :])
    q = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 15  # [BN, 8, 16]: column 16 i + j
    w8 = (tl.reshape(q, (BLOCK_N, 128)) - 8).to(tl.float32).to(tl.float8e4nv)  # small integers: exact
    cols = kb * 128 + tl.arange(0, 128)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + cols[None, :], w8, mask=(offs_n < N)[:, None])


def w4a8_can_implement(group_size: int, n: int, k: int, device) -> tuple[bool, str]:
    if group_size != GROUP_SIZE:
        return False, f"w4a8 group size {group_size} is not supported; supported: {GROUP_SIZE}"
    if n <= 0 or k <= 0:
        return False, f"empty weight N={n}, K={k}"
    return _device_ok(device)


def w4a8_repack(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, k: int) -> W4A8Weights:
    """Canonical symmetric int4 (scheme.py) -> W4A8Weights, once at load."""
    if group_size != GROUP_SIZE:
        raise ValueError(f"w4a8_repack: group size {group_size} is not supported; supported: {GROUP_SIZE}")
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, math.ceil(k / 8)):
        raise ValueError(f"w4a8_repack: qweight must be int32 [N, ceil(K/8)] = [{n}, {math.ceil(k / 8)}], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    nkb = math.ceil(k / GROUP_SIZE)
    if tuple(scales.shape) != (n, nkb) or not scales.is_floating_point():
        raise ValueError(f"w4a8_repack: scales must be float [N, ceil(K/128)] = [{n}, {nkb}], "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    # w4a16 treats G >= K as one group: K <= 128 is the same single group of 128 here
    return W4A8Weights(w4a16_repack(qweight, scales, None, None, 4, GROUP_SIZE, k), n, k)


def int4_to_fp8(w: W4A8Weights) -> torch.Tensor:
    """e4m3 [N, Kp] = q - 8, Kp = ceil(K/128) * 128 (the dequant candidates' scratch weight)."""
    nkb = w.w16.qweight.shape[0]
    out = torch.empty((w.n, nkb * GROUP_SIZE), dtype=torch.float8_e4m3fn, device=w.w16.qweight.device)
    block_n = 64
    int4_to_fp8_kernel[(triton.cdiv(w.n, block_n), nkb)](w.w16.qweight, out, w.n, out.stride(0), BLOCK_N=block_n,
                                                        num_warps=4)
    return out


def _scales_f32(w: W4A8Weights) -> torch.Tensor:
    """[N, ceil(K/128)] fp32 with strides (1, N) (column-major, what cuBLAS 1 x 128 scales are): a small pass."""
    return w.w16.scales[:math.ceil(w.k / GROUP_SIZE)].float().t()


def cublas_ok(w: W4A8Weights, m: int) -> bool:
    return (w.w16.qweight.is_cuda and w.k % 128 == 0 and w.n % 16 == 0 and m >= CUBLAS_MIN_M
            and cublas_block_scaling(w.w16.qweight.device))


@functools.lru_cache(maxsize=None)
def _select() -> dict:
    """The defaults overlaid with configs/w4a8_select.json (read once, as load_config)."""
    return {**_DEFAULT_SELECT, **{k: v for k, v in load_config("w4a8_select").items() if k in _DEFAULT_SELECT}}


@functools.lru_cache(maxsize=None)
def _ranges(n: int, k: int, act: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The M ranges of the w16 candidate (measured for this shape, else w16_default), of fused_pre (measured only)
    and of dequant_cublas_x128 (per-tensor activations; measured for this shape, else x128_default) for one shape and
    activation granularity, looked up once (pick_candidate runs per forward)."""
    sel = _select()
    w16 = sel["w16"].get(f"{n}x{k}", {}).get(act, sel["w16_default"])
    x128 = sel["x128"].get(f"{n}x{k}", sel["x128_default"]) if act in _PER_TENSOR else None
    return (_m_range("w16", w16), _m_range("fused_pre", sel["fused_pre"].get(f"{n}x{k}", {}).get(act)),
            _m_range("x128", x128))


def fused_config(w: W4A8Weights, m: int, device, act: str | None = None) -> dict:
    """act: the granularity quantized in-kernel (None: x arrives as e4m3); fused_exact / fused_row_skip / fused_wide8
    of configs/w4a8_select.json."""
    sel = _select()
    cfg = fp8act_config(w.w16, m, device, WIDE_BLOCK_N if m >= sel["fused_wide_min_m"] else None)
    lo, hi = sel["fused_wide8"].get(act, (0, -1)) if act else (0, -1)
    if lo <= m <= hi:
        cfg = dict(cfg, **WIDE8)
    return dict(cfg, row_pad=bool(sel["fused_row_skip"]), exact=bool(sel["fused_exact"]))


def pick_candidate(w: W4A8Weights, m: int, act: str = "token_group", out16: bool = True) -> str:
    """out16: x and the output are the same 16-bit dtype (what the w16 candidate needs)."""
    sel = _select()
    (lo, hi), (pre_lo, pre_hi), (x_lo, x_hi) = _ranges(w.n, w.k, act)
    if w.w16.qweight.is_cuda and out16 and lo <= m <= hi:  # (measured against every other pick, fused_pre too)
        return "w16"
    if w.w16.qweight.is_cuda and pre_lo <= m <= min(pre_hi, FP8_ACT_MAX_M):
        return "fused_pre"
    if m <= min(sel["fused_max_m"], FP8_ACT_MAX_M) or (not w.w16.qweight.is_cuda and m <= FP8_ACT_MAX_M):
        return "fused"
    if m >= sel["dequant_cublas_min_m"] and cublas_ok(w, m):
        return "dequant_cublas_x128" if x_lo <= m <= x_hi else "dequant_cublas"
    return "dequant"


def _dequant_cublas(xq, xs, act: str, w: W4A8Weights, bias, out_dtype, x128: bool = False) -> torch.Tensor:
    """x128 (per-tensor act only): the one x scale as a constant 128x128 block grid, which torch wants as
    [K/128, ceil(M/128)] with strides (1, K/128); else x's scales as 1 x 128 blocks [M, K/128] column-major."""
    F = torch.nn.functional
    m, kb = xq.shape[0], w.k // GROUP_SIZE
    if x128 and act not in _PER_TENSOR:
        raise ValueError(f"w4a8_linear: candidate 'dequant_cublas_x128' needs one activation scale "
                         f"({', '.join(_PER_TENSOR)}), got {act!r}")
    if not cublas_ok(w, m):
        raise ValueError(f"w4a8_linear: dequant_cublas needs K % 128 == 0, N % 16 == 0 and M >= {CUBLAS_MIN_M}; "
                         f"got M={m}, N={w.n}, K={w.k}")
    if x128:
        xs, recipe = xs.reshape(1, 1).expand(math.ceil(m / 128), kb).contiguous().t(), F.ScalingType.BlockWise128x128
    elif act != "token_group":  # [1] or [M, 1] -> [M, K/128] column-major, every block of a row with the row's scale
        xs, recipe = xs.reshape(1, -1).expand(kb, m).contiguous().t(), F.ScalingType.BlockWise1x128
    else:
        xs, recipe = (xs if xs.stride(0) == 1 else xs.t().contiguous().t()), F.ScalingType.BlockWise1x128
    y = F.scaled_mm(xq, int4_to_fp8(w).t(), xs, recipe, _scales_f32(w), F.ScalingType.BlockWise1x128,
                    output_dtype=out_dtype)
    return y if bias is None else y.add_(bias)


PREQUANTIZED = ("fused_pre", "dequant_cublas", "dequant_cublas_x128", "dequant")  # the candidates reading e4m3 x


def prequantized_candidate(w: W4A8Weights, m: int, act: str) -> str:
    """The candidate for x quantized by its producer: pick_candidate's, where it reads e4m3 x; for its w16 / fused
    picks (which quantize x themselves) the fused_pre kernel at decode sizes, else the scratch + cuBLAS GEMM."""
    cand = pick_candidate(w, m, act, out16=False)
    if cand in PREQUANTIZED:
        return cand
    if m <= FP8_ACT_MAX_M:
        return "fused_pre"
    return "dequant_cublas" if cublas_ok(w, m) else "dequant"


def producer_candidate(w: W4A8Weights, m: int, act: str, out16: bool) -> str:
    """pick_candidate's pick for x whose producer (the norm / SiLU-mul kernels) can write it quantized or
    fake-quantized: w16 in place of the decode picks fused / fused_pre, which exist only to save the quantization a
    pass of its own -- with that pass fused into the producer the GEMM is w4a16's on the same int4 bytes (16-bit x
    and output only)."""
    cand = pick_candidate(w, m, act, out16)
    return "w16" if out16 and cand in ("fused", "fused_pre") else cand


def _linear_prequantized(xq, w: W4A8Weights, act: str, xs, bias, out_dtype, candidate) -> torch.Tensor:
    if act not in GRANULARITIES:
        raise ValueError(f"w4a8_linear: activation granularity {act!r} is not supported; supported: {GRANULARITIES}")
    if xs is None or out_dtype is None:
        raise ValueError("w4a8_linear: e4m3 x needs x_scale and out_dtype")
    if xq.shape[-1] != w.k:
        raise ValueError(f"w4a8_linear: x has {xq.shape[-1]} columns, the weight needs K={w.k}")
    if bias is not None and bias.shape != (w.n,):
        raise ValueError(f"w4a8_linear: bias shape {tuple(bias.shape)}, expected ({w.n},)")
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, w.k)
    m = x2.shape[0]
    cand = candidate or prequantized_candidate(w, m, act)
    if cand not in PREQUANTIZED:
        raise ValueError(f"w4a8_linear: candidate {cand!r} does not take e4m3 x; supported: {PREQUANTIZED}")
    group = act == "token_group"
    if cand == "fused_pre":
        y = w4a16_gemm_fp8act(x2, w.w16, "e4m3_group" if group else "e4m3_row", xs.float(), bias, out_dtype,
                              config=fused_config(w, m, x2.device))
    elif cand in ("dequant_cublas", "dequant_cublas_x128"):
        y = _dequant_cublas(x2, xs, act, w, bias, out_dtype, cand == "dequant_cublas_x128")
    else:
        tuned = load_config("fp8_block")
        rows = torch.arange(w.n, dtype=torch.int32, device=x2.device)
        y = fp8_block.fp8_block_gemm(x2, xs, group, int4_to_fp8(w), _scales_f32(w).contiguous(), rows, w.n, w.k,
                                     bias=bias, out_dtype=out_dtype, config=fp8_block.block_config(m, tuned),
                                     tma=bool(tuned.get("tma", False)))
    return y.reshape(*lead, w.n)


def w4a8_linear(x: torch.Tensor, w: W4A8Weights, act_granularity: str, input_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, ue8m0: bool = False,
                candidate: str | None = None, pre_quant_scale: torch.Tensor | None = None,
                silu_mul: bool = False, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias) with (x * pre_quant_scale) quantized to e4m3 per act_granularity
    (token_group: G = 128). pre_quant_scale [K] in x's dtype is fused into x's quantization (the decode kernel's x
    load, or the quantization pass), rounded to x's dtype as the unfused product; one of another dtype promotes, so
    that product is formed first. silu_mul: x is gate | up [..., 2K] and the layer's input is silu(gate) * up (the
    MLP's down projection): where x is quantized (or fake-quantized) in a pass of its own, SiLU-and-mul runs inside
    that pass (quant_act.py's SILU mode: gate | up read once, the 16-bit product never written); where the GEMM
    quantizes in-kernel (decode) or the pre_quant_scale promotes, the product is formed first as F.silu(gate) * up.
    x already e4m3 (quantized by its producer, e.g. norm.rms_norm_quantize_fp8) comes with x_scale in quantize_fp8's
    layout (token_group: column-major) and out_dtype; it runs on the candidates that read e4m3 x: fused_pre (decode
    sizes), dequant_cublas(_x128), dequant."""
    if x.dtype == torch.float8_e4m3fn:
        return _linear_prequantized(x, w, act_granularity, x_scale, bias, out_dtype, candidate)
    if act_granularity not in GRANULARITIES:
        raise ValueError(f"w4a8_linear: activation granularity {act_granularity!r} is not supported; "
                         f"supported: {GRANULARITIES}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4a8_linear: x dtype {x.dtype} is not supported; supported: fp16, bf16, fp32")
    if x.shape[-1] != w.k * (2 if silu_mul else 1):
        what = f"gate|up 2K={2 * w.k}" if silu_mul else f"K={w.k}"
        raise ValueError(f"w4a8_linear: x has {x.shape[-1]} columns, the weight needs {what}")
    if act_granularity == "tensor_static" and (input_scale is None or input_scale.numel() != 1):
        raise ValueError("w4a8_linear: tensor_static activations need a one-element input_scale (max over shards)")
    if bias is not None and bias.shape != (w.n,):
        raise ValueError(f"w4a8_linear: bias shape {tuple(bias.shape)}, expected ({w.n},)")
    if pre_quant_scale is not None and pre_quant_scale.shape != (w.k,):
        raise ValueError(f"w4a8_linear: pre_quant_scale shape {tuple(pre_quant_scale.shape)}, expected ({w.k},)")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    out16 = x.dtype in W16_DTYPES and out_dtype == x.dtype and (pre_quant_scale is None
                                                                or pre_quant_scale.dtype == x.dtype)
    cand = candidate or pick_candidate(w, m, act_granularity, out16)
    if cand not in CANDIDATES:
        raise ValueError(f"w4a8_linear: candidate {cand!r} is not supported; supported: {CANDIDATES}")
    in_kernel = cand == "fused" and act_granularity in _FUSED_MODES
    # x * pre_quant_scale is fused into x's quantization (in-kernel or its own pass) where the product stays in x's
    # dtype; a scale of another dtype promotes, so that product is formed first, as the unfused layer would
    pqs_fused = pre_quant_scale is None or pre_quant_scale.dtype == x.dtype
    if silu_mul and (in_kernel or not pqs_fused):  # no pass of its own to fuse SiLU-and-mul into
        gate, up = x2.chunk(2, dim=-1)
        x2, silu_mul = torch.nn.functional.silu(gate) * up, False
    if not pqs_fused:
        x2, pre_quant_scale = x2 * pre_quant_scale, None
    if in_kernel:
        scale = input_scale.reshape(1).float() if act_granularity == "tensor_static" else None
        y = w4a16_gemm_fp8act(x2, w.w16, _FUSED_MODES[act_granularity], scale, bias, out_dtype, pre_quant_scale,
                              ue8m0, fused_config(w, m, x.device, act_granularity))
        return y.reshape(*lead, w.n)
    if cand == "w16":
        if not out16:
            raise ValueError(f"w4a8_linear: candidate 'w16' needs 16-bit x and output of one dtype and a "
                             f"pre_quant_scale of that dtype; got x {x.dtype}, out {out_dtype}")
        xf = fake_quantize_act_fp8(x2, act_granularity, input_scale, GROUP_SIZE, ue8m0, silu_mul=silu_mul,
                                   pre_quant_scale=pre_quant_scale)
        return w4a16_gemm(xf, w.w16, bias).reshape(*lead, w.n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    group = act_granularity == "token_group"
    quant = silu_mul_quantize_fp8 if silu_mul else quantize_fp8
    xq, xs = quant(x2, act_granularity, input_scale, GROUP_SIZE, ue8m0, column_major_scales=group,
                   pre_quant_scale=pre_quant_scale)
    # token / tensor_dynamic on fused (the whole row's amax comes first), or forced: the fused_pre kernel
    y = _linear_prequantized(xq, w, act_granularity, xs, bias, out_dtype, "fused_pre" if cand == "fused" else cand)
    return y.reshape(*lead, w.n)
