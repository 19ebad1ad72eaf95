"""Activation quantization kernels vs reference.quantize_fp8_ref: bitwise equal codes and scales.

The kernels divide with IEEE rounding (div_rn) and round to nearest even like torch's cast, so the math is
identical and codes must match exactly. The fused SiLU-and-mul differs from torch's F.silu only in the exp
(last fp32 bit), so there codes may differ by one e4m3 ulp on a few elements.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.quant_act import fake_quantize_act_fp8, quantize_fp8, silu_mul_quantize_fp8
from lowbit.kernels.reference import quantize_fp8_ref

GRANS = ["tensor_static", "tensor_dynamic", "token", "token_group"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _codes(q: torch.Tensor) -> torch.Tensor:
    """e4m3 bits -> signed ordinal (adjacent representable values differ by 1)."""
    b = q.view(torch.uint8).to(torch.int32)
    return torch.where(b >= 128, -(b & 127), b)


def _data(m, k, dtype, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    # spread magnitudes over 6 decades so subnormals, saturation of static scales and every binade appear
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 2, k)[torch.randperm(k, generator=g)]
    x = x.to(dtype)
    if m > 2:
        x[2] = 0  # an all-zero row: scale clamps at 1e-12
    return x.to(device)


def _static_scale(device=DEV):
    return torch.tensor([0.05], device=device)  # saturates the large entries at +-448


def _check_exact(x, gran, ue8m0=False, column_major=False):
    scale = _static_scale(x.device) if gran == "tensor_static" else None
    q, s = quantize_fp8(x, gran, scale, 128, ue8m0, column_major_scales=column_major)
    qr, sr = quantize_fp8_ref(x, gran, scale, 128, ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == sr.shape and s.dtype == torch.float32
    assert torch.equal(s, sr), (s - sr).abs().max()
    mism = (q.view(torch.uint8) != qr.view(torch.uint8)).sum().item()
    assert mism == 0, f"{mism} codes differ"


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_exact_small(gran, dtype):
    _check_exact(_data(5, 300, dtype), gran)  # odd M, K not a multiple of 128 (partial group)


@pytest.mark.parametrize("gran", ["tensor_static", "tensor_dynamic"])
def test_quantize_rows_split_over_k(gran):
    """Few rows (decode): the per-tensor modes cut each row into ROWS_SPLIT_BLOCK_K tiles, one program each (the last
    one partial); codes, scales and fake-quantized values stay the reference's bit for bit, SiLU-mul + pre_quant_scale
    included."""
    from lowbit.kernels import quant_act

    k = 2 * quant_act.ROWS_SPLIT_BLOCK_K + 452  # two whole tiles and a partial one
    x = _data(3, k, torch.float16)
    _check_exact(x, gran)
    _check_fake(x, gran)
    gu = torch.randn(2, 2 * k, generator=torch.Generator().manual_seed(2)).to(torch.float16).to(DEV) * 3
    pqs = _pqs(k, torch.float16)
    scale = _static_scale(DEV) if gran == "tensor_static" else None
    q, s = silu_mul_quantize_fp8(gu, gran, scale, pre_quant_scale=pqs)
    qr, sr = quantize_fp8_ref((F.silu(gu[:, :k]) * gu[:, k:]) * pqs, gran, scale)
    torch.testing.assert_close(s, sr, rtol=2e-2, atol=0)
    assert (_codes(q) - _codes(qr)).abs().max().item() <= 1
    fake = fake_quantize_act_fp8(gu, gran, scale, silu_mul=True, pre_quant_scale=pqs)
    assert torch.equal(fake, (q.float() * s.reshape(-1, 1)).to(torch.float16))


def _check_fake(x, gran, ue8m0=False):
    """fake_quantize_act_fp8 = the reference codes times their scales, rounded once to x.dtype, bit for bit."""
    scale = _static_scale(x.device) if gran == "tensor_static" else None
    qr, sr = quantize_fp8_ref(x, gran, scale, 128, ue8m0)
    m, k = x.shape
    s = sr.reshape(-1, 1) if gran != "token_group" else sr.repeat_interleave(128, dim=1)[:, :k]
    want = (qr.float() * s).to(x.dtype)
    got = fake_quantize_act_fp8(x, gran, scale, 128, ue8m0)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quantize(gran, dtype):
    _check_fake(_data(5, 300, dtype), gran)
    _check_fake(_data(1, 576, dtype), gran, ue8m0=gran == "token_group")


@pytest.mark.parametrize("gran", ["token", "token_group"])
def test_quantize_m1(gran):
    _check_exact(_data(1, 576, torch.float16), gran)


@pytest.mark.parametrize("extra", [1, 300])
def test_token_rows_wider_than_one_tile(monkeypatch, extra):
    """Token rows wider than ROWS_MAX_SINGLE_K: two passes over K chunks (the reference's codes and scales), and for
    SiLU-mul two register tiles (one read of x) up to ROWS_TWO_TILES_MAX_K. With SiLU-mul and pre_quant_scale the two
    launch forms agree bit for bit (codes, scales and fake-quantized values) and stay within one code of torch."""
    from lowbit.kernels import quant_act

    k = quant_act.ROWS_MAX_SINGLE_K + extra  # the second tile partly masked
    x = _data(2, k, torch.float16)
    x[:, k - 1] = 300.0  # each row's amax in the second tile
    gu = torch.randn(2, 2 * k, generator=torch.Generator().manual_seed(3)).to(torch.float16).to(DEV) * 3
    gu[:, k - 1] = gu[:, 2 * k - 1] = 30.0
    pqs = _pqs(k, torch.float16)
    out = {}
    for two_tiles in (True, False):
        monkeypatch.setattr(quant_act, "ROWS_TWO_TILES_MAX_K", 2 * quant_act.ROWS_MAX_SINGLE_K if two_tiles else 0)
        _check_exact(x, "token")
        q, s = silu_mul_quantize_fp8(gu, "token", pre_quant_scale=pqs)
        fake = fake_quantize_act_fp8(gu, "token", silu_mul=True, pre_quant_scale=pqs)
        out[two_tiles] = q, s, fake
    (q, s, fake), (q2, s2, fake2) = out[True], out[False]
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2) and torch.equal(fake, fake2)
    assert torch.equal(fake, (q.float() * s).to(torch.float16))
    qr, sr = quantize_fp8_ref((F.silu(gu[:, :k]) * gu[:, k:]) * pqs, "token")
    torch.testing.assert_close(s, sr, rtol=2e-2, atol=0)
    assert (_codes(q) - _codes(qr)).abs().max().item() <= 1


def test_quantize_ue8m0_and_column_major_scales():
    x = _data(3, 1000, torch.float16)
    _check_exact(x, "token_group", ue8m0=True)
    q, s = quantize_fp8(x, "token_group", ue8m0=True, column_major_scales=True)
    assert s.stride() == (1, 3)
    s_ref = quantize_fp8_ref(x, "token_group", ue8m0=True)[1]
    assert torch.equal(s, s_ref)
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two


@pytest.mark.parametrize("rows_min_m", [1, 1 << 30])
def test_quantize_tensor_dynamic_amax_launch_shapes(monkeypatch, rows_min_m):
    """The amax pass walks whole rows (large M) or splits K over programs (small M); both give the reference scale."""
    from lowbit.kernels import quant_act

    monkeypatch.setattr(quant_act, "AMAX_ROWS_MIN_M", rows_min_m)
    _check_exact(_data(3, 2500, torch.bfloat16), "tensor_dynamic")  # K: 2 full 1024 steps and a partial one
    _check_exact(_data(6, 700, torch.float16)[::2, 50:650], "tensor_dynamic")  # strided rows, offset columns
    _check_silu(torch.randn(3, 2 * 1100, generator=torch.Generator().manual_seed(2)).to(DEV) * 3, "tensor_dynamic")


def test_quantize_noncontiguous_input():
    base = _data(6, 700, torch.float32)
    x = base[::2, 50:650]  # row stride 1400, column offset
    assert not x.is_contiguous()
    for gran in GRANS:
        _check_exact(x, gran)
    xt = _data(260, 4, torch.float32).t()  # unit row stride, column stride 4
    _check_exact(xt, "token_group")


def test_quantize_saturates_and_zero_rows():
    x = torch.tensor([[1000.0, -1000.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]], device=DEV)
    q, s = quantize_fp8(x, "tensor_static", torch.tensor([1.0], device=DEV))
    assert q[0, :2].float().tolist() == [448.0, -448.0]
    q, s = quantize_fp8(x, "token")
    assert s[1].item() == pytest.approx(1e-12) and torch.all(q[1].float() == 0)


def test_quantize_empty():
    q, s = quantize_fp8(torch.zeros(0, 256, device=DEV), "token_group")
    assert q.shape == (0, 256) and s.shape == (0, 2)


def test_quantize_errors():
    x = torch.zeros(2, 8, device=DEV)
    with pytest.raises(ValueError, match="granularity"):
        quantize_fp8(x, "channel")
    with pytest.raises(ValueError, match="dtype"):
        quantize_fp8(x.to(torch.int32), "token")
    with pytest.raises(ValueError, match="tensor_static"):
        quantize_fp8(x, "tensor_static")
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(x[0], "token")
    with pytest.raises(ValueError, match="group_size"):
        quantize_fp8(x, "token_group", group_size=100)
    with pytest.raises(ValueError, match="odd"):
        silu_mul_quantize_fp8(torch.zeros(2, 7, device=DEV), "token")


def _check_silu(x, gran):
    i = x.shape[1] // 2
    scale = _static_scale(x.device) if gran == "tensor_static" else None
    q, s = silu_mul_quantize_fp8(x, gran, scale)
    h = F.silu(x[:, :i]) * x[:, i:]  # the unfused op in the model dtype
    qr, sr = quantize_fp8_ref(h, gran, scale)
    assert q.shape == (x.shape[0], i) and s.shape == sr.shape
    torch.testing.assert_close(s, sr, rtol=2e-2, atol=0)
    diff = (_codes(q) - _codes(qr)).abs()
    assert diff.max().item() <= 1
    assert diff.float().mean().item() < 0.02


@pytest.mark.parametrize("gran", GRANS)
def test_silu_mul_quantize(gran):
    x = torch.randn(3, 2 * 200, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(DEV) * 3
    _check_silu(x, gran)


def _pqs(k, dtype, device=DEV):
    return (0.5 + torch.rand(k, generator=torch.Generator().manual_seed(7))).to(dtype).to(device)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_pre_quant_scale(gran, dtype):
    """quantize_fp8 with pre_quant_scale = quantize_fp8 of the unfused x * pre_quant_scale (in x's dtype), bit for
    bit; the fake-quantized values likewise."""
    x, pqs = _data(5, 300, dtype), _pqs(300, dtype)
    scale = _static_scale(x.device) if gran == "tensor_static" else None
    q, s = quantize_fp8(x, gran, scale, pre_quant_scale=pqs)
    qr, sr = quantize_fp8_ref(x * pqs, gran, scale)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    if dtype != torch.float32:
        assert torch.equal(fake_quantize_act_fp8(x, gran, scale, pre_quant_scale=pqs),
                           fake_quantize_act_fp8(x * pqs, gran, scale))


@pytest.mark.parametrize("gran", GRANS)
def test_silu_mul_quantize_pre_quant_scale(gran):
    """SiLU-and-mul, then x pre_quant_scale: as quantize_fp8 of the unfused (silu(gate) * up) * pqs, up to the exp's
    last bit (one e4m3 step on a few codes); the fake-quantized form (w4a8's w16 path) matches its own codes."""
    x = torch.randn(3, 2 * 200, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(DEV) * 3
    pqs = _pqs(200, torch.float16)
    scale = _static_scale(x.device) if gran == "tensor_static" else None
    q, s = silu_mul_quantize_fp8(x, gran, scale, pre_quant_scale=pqs)
    qr, sr = quantize_fp8_ref((F.silu(x[:, :200]) * x[:, 200:]) * pqs, gran, scale)
    torch.testing.assert_close(s, sr, rtol=2e-2, atol=0)
    diff = (_codes(q) - _codes(qr)).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() < 0.02
    fake = fake_quantize_act_fp8(x, gran, scale, silu_mul=True, pre_quant_scale=pqs)
    sx = s.reshape(-1, 1) if gran != "token_group" else s.repeat_interleave(128, dim=1)[:, :200]
    assert fake.shape == (3, 200) and torch.equal(fake, (q.float() * sx).to(torch.float16))


def test_pre_quant_scale_errors():
    x = torch.zeros(2, 8, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"pre_quant_scale must be \[K=8\] torch.float16"):
        quantize_fp8(x, "token", pre_quant_scale=torch.ones(8, device=DEV))  # fp32 scale for fp16 x
    with pytest.raises(ValueError, match=r"pre_quant_scale must be \[K=4\]"):
        silu_mul_quantize_fp8(x, "token", pre_quant_scale=torch.ones(8, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="odd"):
        fake_quantize_act_fp8(torch.zeros(2, 7, device=DEV), "token", silu_mul=True)


# ---- GPU: hardware cvt path, large shapes, bf16, CUDA graphs -------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7168), (33, 2112), (517, 576), (64, 18432)])
def test_gpu_quantize_exact(gran, dtype, shape):
    _check_exact(_data(*shape, dtype, device="cuda"), gran)


@pytest.mark.gpu
def test_gpu_quantize_saturates_without_clamp_and_keeps_nan():
    """The GPU path has no explicit clamp (cvt.rn.satfinite saturates): out-of-range codes are +-448 and NaN stays
    NaN, as in the reference (torch.clamp propagates NaN), in the standalone kernels and the w4a8 in-kernel path."""
    from lowbit.kernels.w4a16 import w4a16_repack
    from lowbit.kernels.w4a16_fp8act import w4a16_gemm_fp8act

    x = torch.tensor([[1000.0, -1000.0, float("nan"), 0.5, 448.5, -449.0, 3e38, 0.0]], device="cuda")
    x = torch.cat([x, torch.zeros(1, 120, device="cuda")], 1)
    one = torch.tensor([1.0], device="cuda")
    q, _ = quantize_fp8(x, "tensor_static", one)
    q_ref, _ = quantize_fp8_ref(x, "tensor_static", one)
    assert q[0, :2].float().tolist() == [448.0, -448.0]
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # the w4a8 decode kernel quantizes the same row in-kernel: with unit int4 weights in column c only, y = code * 1
    qw = torch.full((8, 16), 0x88888888 - 2**32, dtype=torch.int32, device="cuda")  # q = 8: weight 0 everywhere
    qw[:, 0] = 0x88888889 - 2**32  # column 0 of every row: q = 9, weight 1
    w = w4a16_repack(qw, torch.ones(8, 1, device="cuda", dtype=torch.float16), None, None, 4, 128, 128)
    for c in range(8):
        xc = torch.zeros_like(x)
        xc[0, 0] = x[0, c]
        y = w4a16_gemm_fp8act(xc.half() if c != 6 else xc, w, "static", one, out_dtype=torch.float32,
                              config={"path": "fused", "BLOCK_N": 64, "BLOCK_M": 16, "exact": False})
        want = q_ref[0, c].float()
        assert (torch.isnan(y[0, 0]) and torch.isnan(want)) or y[0, 0] == want, (c, y[0, 0].item(), want.item())


@pytest.mark.gpu
def test_gpu_quantize_ue8m0_large():
    _check_exact(_data(300, 7168, torch.bfloat16, device="cuda"), "token_group", ue8m0=True, column_major=True)


@pytest.mark.gpu
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_silu_mul_quantize(gran, dtype):
    x = torch.randn(77, 2 * 2048, device="cuda").to(dtype) * 3
    _check_silu(x, gran)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2048, 7168), (1100, 16500)])
def test_gpu_tensor_dynamic_large_m(shape):
    """M >= AMAX_ROWS_MIN_M: the amax pass walks whole rows; direct, then replayed from a CUDA graph on new data."""
    x = _data(*shape, torch.bfloat16, device="cuda")
    _check_exact(x, "tensor_dynamic")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = quantize_fp8(x, "tensor_dynamic")
    for seed in (5, 6):  # repeated replays: the amax is re-zeroed every call
        x.copy_(_data(*shape, torch.bfloat16, device="cuda", seed=seed) * seed)
        graph.replay()
        torch.cuda.synchronize()
        qr, sr = quantize_fp8_ref(x, "tensor_dynamic")
        assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("gran", GRANS)
def test_gpu_quantize_cuda_graph(gran):
    x = _data(16, 7168, torch.bfloat16, device="cuda")
    scale = _static_scale("cuda") if gran == "tensor_static" else None
    quantize_fp8(x, gran, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = quantize_fp8(x, gran, scale)
    x.copy_(_data(16, 7168, torch.bfloat16, device="cuda", seed=5))
    graph.replay()
    torch.cuda.synchronize()
    qr, sr = quantize_fp8_ref(x, gran, scale)
    assert torch.equal(s.reshape(sr.shape), sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
