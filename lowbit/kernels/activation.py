"""SiLU-and-mul of the MLP's fused gate | up projection in one Triton pass (layers/activation.py GatedAct on a GPU).

    y[m, i] = DT(DT(silu(x[m, i])) * x[m, I + i])       x = gate | up [M, 2I], DT = x's dtype, fp32 inside

The roundings are those of the torch ops it replaces (F.silu(gate) rounded to DT, then the product rounded to DT:
quant_act._load_act, which the fp8 quantization passes share); for 16-bit x the kernel's exp is not torch's, so its
SiLU can be a few fp32 ulps off, which after the DT roundings rarely moves a value by one or two DT ulps; fp32 x on
the GPU takes libdevice's expf, torch's own (tests/kernels/test_activation.py). Unfused, torch runs two kernels and
writes and re-reads the [M, I] SiLU output (bytes per output element: read 4, write 2, read 2, write 2 = 10; here
4 + 2 = 6), which at decode sizes is two launches where one does.

| tensor | dtype          | shape   | notes                                   |
|--------|----------------|---------|-----------------------------------------|
| x      | fp16/bf16/fp32 | [M, 2I] | gate | up; unit stride along the last dim |
| y      | x.dtype        | [M, I]  | contiguous                              |
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.quant_act import _load_act, soft_cast

BLOCK_I = 1024  # columns per program
TILE_ELEMS = 8192  # rows per program: as many as keep ~8K elements in flight
FEW_ROWS = 64  # below this M (decode) one row per program and BLOCK_I / 2 columns: more programs (H100, I = 18432,
# M = 16: 3.5 us on 8-row tiles, 36 programs)


@triton.jit
def silu_mul_kernel(x_ptr, y_ptr, M, I, stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_m[:, None] < M) & (offs_i[None, :] < I)
    rows = offs_m[:, None].to(tl.int64)
    h = _load_act(x_ptr + rows * stride_xm + offs_i[None, :], mask, I, True, x_ptr, False)
    tl.store(y_ptr + rows * stride_ym + offs_i[None, :], h.to(y_ptr.dtype.element_ty), mask=mask)


def supported(x: torch.Tensor) -> bool:
    """Whether silu_mul takes x (else the torch ops run): 16/32-bit on a GPU (or the CPU under the interpreter), an
    even last dim."""
    return ((x.is_cuda or soft_cast()) and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.dim() >= 1
            and x.shape[-1] % 2 == 0)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = gate | up -> silu(gate) * up [..., I], rounded as the torch ops round (see the module doc)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"silu_mul: x dtype {x.dtype} is not supported; supported: fp16, bf16, fp32")
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"silu_mul: x must be [..., 2I] (gate | up), got {tuple(x.shape)}")
    i = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, i), dtype=x.dtype, device=x.device)
    if m and i:
        block_i = min(BLOCK_I if m >= FEW_ROWS else BLOCK_I // 2, max(16, triton.next_power_of_2(i)))
        block_m = 1 if m < FEW_ROWS else min(max(1, TILE_ELEMS // block_i), triton.next_power_of_2(m))
        silu_mul_kernel[(triton.cdiv(m, block_m), triton.cdiv(i, block_i))](
            x2, y, m, i, x2.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_I=block_i,
            num_warps=4 if block_m == 1 else 8)
    return y.reshape(*x.shape[:-1], i)
