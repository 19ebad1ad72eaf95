"""Fused add + RMSNorm (+ fp8 quantization) kernels against the torch module and reference.quantize_fp8_ref.

rms_norm is checked against layers/norm.RMSNorm (its torch path): the sum of squares runs in another order, so a
16-bit value may differ by one ulp of x's dtype, never more (fp32: a few ulps). The quantizing forms must quantize
exactly the h that rms_norm returns: their codes and scales are compared bit for bit with
quantize_fp8_ref(h [* pre_quant_scale]).
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.norm import MAX_K, rms_norm, rms_norm_quantize_fp8
from lowbit.kernels.reference import quantize_fp8_ref
from lowbit.layers.norm import RMSNorm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one ulp of the 16-bit dtypes; fp32 keeps the last-bit difference of the row scale through two more products
ULP = {torch.float32: 2.0**-21, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _inputs(m, k, dtype, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype).to(device)
    r = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = (torch.rand(k, generator=g) * 2 + 0.1).to(dtype).to(device)
    return x, r, w


def _module(w, eps):
    mod = RMSNorm(w.shape[0], eps, dtype=w.dtype).to(w.device)
    mod.weight.data.copy_(w)
    return mod


def _within_one_ulp(got, want):
    """Every element equal or one ulp of the dtype apart (relative to the larger magnitude)."""
    g, t = got.float(), want.float()
    tol = ULP[got.dtype] * torch.maximum(g.abs(), t.abs()) + 1e-30
    assert bool(((g - t).abs() <= tol).all()), (g - t).abs().max()
    if got.dtype != torch.float32:  # (in fp32 a row scale one bit off moves most of its row)
        assert (g == t).float().mean().item() > 0.9  # one-ulp differences are the exception


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("resid", [False, True])
def test_rms_norm_matches_module(dtype, resid):
    x, r, w = _inputs(5, 300, dtype)  # odd M, K not a power of two
    mod = _module(w, 1e-5)
    if resid:
        y, res = rms_norm(x, w, 1e-5, residual=r)
        want, want_res = mod(x.clone(), r.clone())
        assert torch.equal(res, want_res)  # x + r rounded once: exact
    else:
        y, want = rms_norm(x, w, 1e-5), mod(x.clone())
    assert y.dtype == dtype and y.shape == x.shape
    _within_one_ulp(y, want)


def test_rms_norm_many_short_rows_and_strided_rows():
    # 37 rows of K = 64 share programs (BLOCK_M > 1); x is a column slice (row stride > K)
    big, r, _ = _inputs(37, 128, torch.float16, seed=1)
    x = big[:, 32:96]
    w = torch.rand(64, dtype=torch.float16, device=DEV) + 0.5
    y, res = rms_norm(x, w, 1e-6, residual=r[:, :64].contiguous())
    want, want_res = _module(w, 1e-6)(x.clone(), r[:, :64].clone())
    assert torch.equal(res, want_res)
    _within_one_ulp(y, want)


def _ref_quant(h, gran, scale, ue8m0, pqs):
    if pqs is not None:
        h = h * pqs
    return quantize_fp8_ref(h, gran, scale, 128, ue8m0)


@pytest.mark.parametrize("gran,ue8m0", [("tensor_static", False), ("token", False), ("token_group", False),
                                        ("token_group", True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("resid", [False, True])
def test_rms_norm_quantize_exact(gran, ue8m0, dtype, resid):
    x, r, w = _inputs(6, 300, dtype, seed=2)  # 300: a partial last group of 128
    scale = torch.tensor([0.01], device=DEV) if gran == "tensor_static" else None  # saturates the largest
    rr = r if resid else None
    h = rms_norm(x, w, 1e-6, residual=rr)
    h = h[0] if resid else h
    q, s, res = rms_norm_quantize_fp8(x, w, 1e-6, gran, scale, ue8m0=ue8m0, residual=rr,
                                      column_major_scales=gran == "token_group")
    qr, sr = _ref_quant(h, gran, scale, ue8m0, None)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == sr.shape and torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    if resid:
        assert torch.equal(res, x + r)
    else:
        assert res is None
    if gran == "token_group":
        assert s.stride() == (1, 6)  # column-major, what the GEMMs read


@pytest.mark.parametrize("gran", ["tensor_static", "token", "token_group"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_quantize_pre_quant_scale_and_fake(gran, dtype):
    x, r, w = _inputs(3, 256, dtype, seed=3)
    pqs = (torch.rand(256, device=DEV) * 3 + 0.25).to(dtype)
    scale = torch.tensor([0.02], device=DEV) if gran == "tensor_static" else None
    h, _ = rms_norm(x, w, 1e-6, residual=r)
    q, s, _ = rms_norm_quantize_fp8(x, w, 1e-6, gran, scale, residual=r, pre_quant_scale=pqs)
    qr, sr = _ref_quant(h, gran, scale, False, pqs)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    f, sf, _ = rms_norm_quantize_fp8(x, w, 1e-6, gran, scale, residual=r, pre_quant_scale=pqs, fake=True)
    assert f.dtype == dtype and torch.equal(sf, sr)
    srep = sr.repeat_interleave(128, dim=1)[:, :256] if gran == "token_group" else sr
    assert torch.equal(f, (qr.float() * srep).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_column_slices_at_decode(monkeypatch, dtype):
    """Up to SPLIT_MAX_M rows each row's columns go to several programs (SPLIT_COLS each, every one summing the whole
    row's squares, token taking the amax of the whole row's h): the plain norm, the residual, every granularity's
    codes and scales and the fake-quantized values are those of the reference on rms_norm's own h, in both launch
    forms (K = 300: a partial last slice and group)."""
    from lowbit.kernels import norm

    x, r, w = _inputs(3, 300, dtype, seed=6)
    x[1, 290] = 40.0  # row 1's amax in the last slice
    pqs = (torch.rand(300, device=DEV) * 3 + 0.25).to(dtype)
    scale = torch.tensor([0.01], device=DEV)
    for cols in (1 << 20, 128):  # one program per row, then three column slices per row
        monkeypatch.setattr(norm, "SPLIT_COLS", cols)
        h, res = rms_norm(x, w, 1e-6, residual=r)
        assert torch.equal(res, x + r)
        for gran in ("tensor_static", "token", "token_group"):
            sc = scale if gran == "tensor_static" else None
            qr, sr = _ref_quant(h, gran, sc, False, pqs)
            q, s, res_q = rms_norm_quantize_fp8(x, w, 1e-6, gran, sc, residual=r, pre_quant_scale=pqs,
                                                column_major_scales=True)
            assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), (cols, gran)
            assert torch.equal(res_q, res)
            f, sf, _ = rms_norm_quantize_fp8(x, w, 1e-6, gran, sc, residual=r, pre_quant_scale=pqs, fake=True)
            srep = sr.repeat_interleave(128, dim=1)[:, :300] if gran == "token_group" else sr
            assert torch.equal(sf, sr) and torch.equal(f, (qr.float() * srep).to(dtype)), (cols, gran)


def test_bad_input_is_named():
    x, r, w = _inputs(2, 64, torch.float16)
    with pytest.raises(ValueError, match="tensor_dynamic"):
        rms_norm_quantize_fp8(x, w, 1e-6, "tensor_dynamic")
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, w.float(), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, w, 1e-6, residual=r[:, :32])
    with pytest.raises(ValueError, match=f"1 .. {MAX_K}"):
        rms_norm(torch.zeros(1, MAX_K + 1, dtype=torch.float16, device=DEV),
                 torch.ones(MAX_K + 1, dtype=torch.float16, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="one-element scale"):
        rms_norm_quantize_fp8(x, w, 1e-6, "tensor_static")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [576, 4096, 7168, 8192])
def test_gpu_bf16_shapes_and_graph(k):
    x, r, w = _inputs(33, k, torch.bfloat16, seed=4)
    y, res = rms_norm(x, w, 1e-6, residual=r)
    want, want_res = _module(w, 1e-6)(x.clone(), r.clone())
    assert torch.equal(res, want_res)
    _within_one_ulp(y, want)
    q, s, _ = rms_norm_quantize_fp8(x, w, 1e-6, "token_group", residual=r, column_major_scales=True)
    qr, sr = quantize_fp8_ref(y, "token_group", None, 128)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    # CUDA-graph capture and replay on new data gives the eager result
    xs, rs = x.clone(), r.clone()
    rms_norm_quantize_fp8(xs, w, 1e-6, "token", residual=rs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qg, sg, resg = rms_norm_quantize_fp8(xs, w, 1e-6, "token", residual=rs)
    x2, r2, _ = _inputs(33, k, torch.bfloat16, seed=5)
    xs.copy_(x2)
    rs.copy_(r2)
    graph.replay()
    qe, se, rese = rms_norm_quantize_fp8(x2, w, 1e-6, "token", residual=r2)
    assert torch.equal(qg.view(torch.uint8), qe.view(torch.uint8)) and torch.equal(sg, se) and torch.equal(resg, rese)
