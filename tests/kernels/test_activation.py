"""kernels/activation.py silu_mul against the torch ops it replaces (F.silu(gate) * up in the same dtype): the
kernel's exp is not torch's, so its SiLU can be an fp32 ulp or two off (measured on the CPU: up to 3 fp32 ulps on the
product, 16% of fp32 values not bit-equal; on an H100 tl.exp was up to 12 off, so fp32 there takes libdevice's expf);
after the 16-bit roundings a value is at most two ulps off (measured: one fp16 value in 15000 by 2 ulps, bf16 all
equal). CPU interpreter (fp32/fp16/bf16 elementwise, no tl.dot) and GPU, odd shapes, leading dims, strided rows."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.activation import silu_mul
from lowbit.layers.activation import GatedAct

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place of a's dtype (0 where equal, +0 and -0 alike; values of opposite signs
    come out huge)."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return (a.view(bits).to(torch.int64) - b.view(bits).to(torch.int64)).abs().masked_fill((a == 0) & (b == 0), 0)


def _check(x):
    i = x.shape[-1] // 2
    want = F.silu(x[..., :i]) * x[..., i:]
    got = silu_mul(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    ulps = _ulps(got, want)
    wide = x.dtype == torch.float32
    assert ulps.max().item() <= (4 if wide else 2), ulps.max()
    assert (ulps == 0).float().mean().item() > (0.75 if wide else 0.99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 300), (5, 2 * 1500), (2, 3, 2 * 64)])
def test_silu_mul_matches_torch(dtype, shape):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).to(dtype).to(DEV)
    _check(x)


def test_silu_mul_strided_rows_and_module():
    """Rows with a stride (a slice of a wider buffer) read in place; GatedAct('silu') runs the kernel on a GPU and the
    torch ops on the CPU."""
    buf = (torch.randn(4, 2 * 200 + 40, generator=torch.Generator().manual_seed(1)) * 3).to(torch.float16).to(DEV)
    x = buf[:, : 2 * 200]
    _check(x)
    act = GatedAct("silu")
    want = silu_mul(x) if DEV == "cuda" else F.silu(x[:, :200]) * x[:, 200:]
    assert torch.equal(act(x), want)


def test_silu_mul_errors():
    with pytest.raises(ValueError, match="gate | up"):
        silu_mul(torch.zeros(2, 7, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype"):
        silu_mul(torch.zeros(2, 8, device=DEV, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 4097])
def test_silu_mul_gpu_large(m):
    x = (torch.randn(m, 2 * 14336, device="cuda") * 4).to(torch.bfloat16)
    _check(x)
    g = torch.cuda.CUDAGraph()
    y = silu_mul(x)  # warm-up (compile) outside the capture
    with torch.cuda.graph(g):
        y = silu_mul(x)
    x.copy_((torch.randn(m, 2 * 14336, device="cuda") * 4).to(torch.bfloat16))
    g.replay()
    assert torch.equal(y, silu_mul(x))
