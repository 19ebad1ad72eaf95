"""w4a16 weight layout: the one-time repack from the canonical int layout into the kernel's layout.

Layout on disk / canonical (lowbit/scheme.py; b = bits, P = 32 // b values per int32):

| tensor    | dtype          | shape          | meaning                                                       |
|-----------|----------------|----------------|---------------------------------------------------------------|
| `qweight` | int32          | [N, ceil(K/P)] | q[n, k] in [0, 2^b) at bits b*(k%P) of word k//P (LSB-first)  |
| `scales`  | fp16/bf16/fp32 | [N, ceil(K/G)] | W = (q - zero) * scale                                        |
| `zeros`   | int32 or none  | [N, ceil(K/G)] | zero point; none: symmetric, zero = 2^(b-1)                   |
| `g_idx`   | int32 or none  | [K]            | group of input column k (act-order); none: k // G             |

Layout in the kernel (W = 16 words per row chunk, KB = P * W columns per K-block, Kp = K padded to KB):

| tensor    | dtype          | shape          | meaning                                                       |
|-----------|----------------|----------------|---------------------------------------------------------------|
| `qweight` | int32          | [Kp/KB, N, W]  | bits b*i of word (t, n, j) = q[n, kernel column t*KB + i*W + j] |
| `scales`  | fp16/bf16/fp32 | [Kp/Gk, N]     | group-major: a tile's scales are one contiguous row (*)       |
| `zeros`   | uint8 or none  | [Kp/Gk, N]     | zero points, one byte each                                    |
| `perm`    | int32 or none  | [Kp]           | act-order: x column read for kernel column k (-1: padding)    |
| `locks`   | int32          | [T]            | split-K tile counters, zero between launches                  |

Bitfield i of a [N, W] word tile is chunk i, a [N, W] operand tile with no unpack shuffle; a tile of
[BN, W] words is BN * 64 contiguous bytes. (*) Gk = 0 (one row) for per-channel; fp32 scales that are
exact in 16 bits are stored in 16 bits.

Act-order sorts the columns by g_idx once here, so each group is a contiguous run of kernel columns
(padded to Gk); the kernel gathers x through `perm`. Padding columns hold q = zero, so W = 0 there.
Chunk pairs (2j, 2j+1) always lie in one group (Gk is a multiple of 2W), which the int4 unpack needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.kernels.reference import unpack_int32

W_WORDS = 16  # words per row chunk: 64 contiguous bytes per row, one 16-column MMA step per chunk
SUPPORTED_BITS = (4, 8)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class W4A16Weights:
    qweight: torch.Tensor  # [Kp/KB, N, W] int32
    scales: torch.Tensor  # [Kp/Gk, N]
    zeros: torch.Tensor | None  # [Kp/Gk, N] uint8
    perm: torch.Tensor | None  # [Kp] int32
    locks: torch.Tensor  # [T] int32 split-K counters
    bits: int
    group_size: int  # canonical G (K for per-channel)
    k: int
    n: int
    k_pad: int
    gk: int  # kernel group size along padded K; 0 = one group (per-channel)
    words: int = W_WORDS
    groups: int = 1  # canonical scale columns Gn
    configs: dict = field(default_factory=dict)  # (M bucket, dtype) -> launch config, filled on first use

    @property
    def block_k(self) -> int:
        return (32 // self.bits) * self.words


def _kernel_group(group_size: int, k: int, block_k: int) -> int:
    """Gk: G as the kernel walks it (0 = one group); None when the kernel cannot split K like that."""
    if group_size <= 0 or group_size >= k:
        return 0
    if group_size < block_k:
        return group_size if block_k % group_size == 0 and group_size >= 2 * W_WORDS else None
    return group_size if group_size % block_k == 0 else None


def w4a16_can_implement(bits, group_size, k, n, has_zeros, has_g_idx, dtype, device) -> tuple[bool, str]:
    device = torch.device(device)
    if bits not in SUPPORTED_BITS:
        return False, f"w4a16: {bits}-bit weights are not supported; supported: {SUPPORTED_BITS}"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"w4a16: activation dtype {dtype} is not supported; supported: {SUPPORTED_DTYPES}"
    if k <= 0 or n <= 0:
        return False, f"w4a16: empty weight N={n} K={k}"
    block_k = (32 // bits) * W_WORDS
    if not has_g_idx and _kernel_group(group_size, k, block_k) is None:
        return False, (f"w4a16: group size {group_size} with K={k} is not supported; supported: per-channel "
                       f"(G >= K), or G >= 32 dividing {block_k} or a multiple of {block_k}")
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False, f"w4a16: compute capability {torch.cuda.get_device_capability(device)} < (8, 0) (sm80+)"
    elif not _interpreting():
        return False, f"w4a16: device {device} needs CUDA (or TRITON_INTERPRET=1)"
    return True, ""


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _act_order_columns(g_idx: torch.Tensor, n_groups: int, block_k: int) -> tuple[torch.Tensor, int, int]:
    """Kernel column -> source column (-1 = padding), Gk and Kp for a g_idx: groups become contiguous runs."""
    g_idx = g_idx.to(torch.int64).cpu()
    counts = torch.bincount(g_idx, minlength=n_groups)
    longest = int(counts.max())
    if longest <= block_k:  # round up to a size the kernel walks: 32, 64 or a whole block
        gk = max(2 * W_WORDS, 1 << (longest - 1).bit_length())
    else:
        gk = math.ceil(longest / block_k) * block_k
    order = torch.argsort(g_idx, stable=True)  # columns of group 0 first, then group 1, ...
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(g_idx)) - starts[g_idx[order]]  # position inside its group
    k_pad = math.ceil(n_groups * gk / block_k) * block_k
    src = torch.full((k_pad,), -1, dtype=torch.int64)
    src[g_idx[order] * gk + rank] = order
    return src, gk, k_pad


def w4a16_repack(qweight, scales, zeros, g_idx, bits, group_size, k, rows_per_step: int = 2048) -> W4A16Weights:
    """Canonical int weights -> W4A16Weights (see the tables above). Runs once at load, on qweight's device."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"w4a16_repack: bits={bits} is not supported; supported: {SUPPORTED_BITS}")
    per = 32 // bits
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or qweight.shape != (n, math.ceil(k / per)):
        raise ValueError(f"w4a16_repack: qweight must be int32 [N, ceil(K/{per})] = [{n}, {math.ceil(k / per)}], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    n_groups = scales.shape[1]
    if scales.shape[0] != n or (zeros is not None and tuple(zeros.shape) != tuple(scales.shape)):
        raise ValueError(f"w4a16_repack: scales {tuple(scales.shape)} / zeros "
                         f"{None if zeros is None else tuple(zeros.shape)} must both be [N={n}, groups]")
    device, block_k = qweight.device, per * W_WORDS
    if g_idx is not None:
        if g_idx.numel() != k:
            raise ValueError(f"w4a16_repack: g_idx has {g_idx.numel()} entries, expected K={k}")
        g_idx = g_idx.reshape(-1)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise ValueError(f"w4a16_repack: g_idx values must lie in [0, {n_groups}), got "
                             f"[{int(g_idx.min())}, {int(g_idx.max())}]")
        src, gk, k_pad = _act_order_columns(g_idx, n_groups, block_k)
        if n_groups == 1:
            gk = 0
    else:
        gk = _kernel_group(group_size, k, block_k)
        if gk is None:
            raise ValueError(f"w4a16_repack: group size {group_size} with K={k} is not supported "
                             f"(see w4a16_can_implement)")
        k_pad = math.ceil(k / block_k) * block_k
        src = torch.arange(k_pad)
        src[k:] = -1
        if n_groups != (1 if gk == 0 else math.ceil(k / gk)):
            raise ValueError(f"w4a16_repack: scales have {n_groups} groups; K={k} with G={group_size} needs "
                             f"{math.ceil(k / group_size) if gk else 1}")
    kg = max(1, k_pad // gk) if gk else 1  # kernel groups
    src = src.to(device)
    valid = src >= 0
    gather = src.clamp(min=0)
    # group of every kernel column (padding inherits its group, so q = zero there gives W = 0)
    col_group = torch.div(torch.arange(k_pad, device=device), gk, rounding_mode="floor") if gk else \
        torch.zeros(k_pad, dtype=torch.int64, device=device)
    col_group = col_group.clamp(max=n_groups - 1)
    half = 1 << (bits - 1)
    blocks = k_pad // block_k
    q_out = torch.empty((blocks, n, W_WORDS), dtype=torch.int32, device=device)
    shifts = (torch.arange(per, device=device, dtype=torch.int64) * bits).view(1, 1, per, 1)
    for r0 in range(0, n, rows_per_step):  # bounded temporaries for large layers
        r1 = min(n, r0 + rows_per_step)
        q = unpack_int32(qweight[r0:r1], bits, k).to(torch.int64)[:, gather]  # [rows, Kp]
        z = zeros[r0:r1].to(torch.int64)[:, col_group] if zeros is not None else torch.full_like(q, half)
        q = torch.where(valid, q, z)
        words = (q.view(r1 - r0, blocks, per, W_WORDS) << shifts).sum(dim=2)  # [rows, blocks, W]
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        q_out[:, r0:r1] = words.transpose(0, 1)
    s_out = torch.zeros((kg, n), dtype=_compact_dtype(scales), device=device)
    s_out[:n_groups] = scales.t().to(s_out.dtype)[:kg]
    z_out = None
    if zeros is not None:
        z_out = torch.full((kg, n), half, dtype=torch.uint8, device=device)
        z_out[:n_groups] = zeros.t().to(torch.uint8)[:kg]
    perm = src.to(torch.int32) if g_idx is not None else None
    locks = torch.zeros(max(64, 8 * math.ceil(n / 64)), dtype=torch.int32, device=device)
    return W4A16Weights(q_out, s_out.contiguous(), z_out, perm, locks, bits, group_size, k, n, k_pad, gk,
                        groups=n_groups)


def _compact_dtype(scales: torch.Tensor) -> torch.dtype:
    """fp32 scales that are exact in 16 bits travel as 16 bits (half the scale bytes)."""
    if scales.dtype != torch.float32:
        return scales.dtype
    for dt in (torch.float16, torch.bfloat16):
        if torch.equal(scales.to(dt).to(torch.float32), scales):
            return dt
    return torch.float32


def w4a16_unpack(w: W4A16Weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of w4a16_repack for checks: (q [N, K] int32 in canonical column order, scales [N, Gn], zeros)."""
    per, blocks = 32 // w.bits, w.k_pad // w.block_k
    shifts = (torch.arange(per, device=w.qweight.device, dtype=torch.int32) * w.bits).view(1, 1, per, 1)
    vals = (w.qweight.unsqueeze(2) >> shifts) & ((1 << w.bits) - 1)  # [blocks, N, P, W]
    qk = vals.permute(1, 0, 2, 3).reshape(w.n, blocks * per * w.words)  # [N, Kp] kernel columns
    src = w.perm.long() if w.perm is not None else torch.arange(w.k_pad, device=qk.device)
    keep = (src >= 0) & (src < w.k)
    q = torch.empty((w.n, w.k), dtype=torch.int32, device=qk.device)
    q[:, src[keep]] = qk[:, keep]
    scales = w.scales[:w.groups].t().contiguous()
    zeros = w.zeros[:w.groups].t().to(torch.int32).contiguous() if w.zeros is not None else None
    return q, scales, zeros
