"""w4a8 (int4 group-128 weights x fp8 activations) vs reference: dequantize_int + quantize_fp8_ref + fp8_gemm_ref.

(q - 8) x e4m3 products are exact in fp32, so the budget is the summation-order one of test_fp8_gemm.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.kernels import reference as ref
from lowbit.kernels.w4a8 import int4_to_fp8, pick_candidate, w4a8_can_implement, w4a8_linear, w4a8_repack

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(n, k, device=DEV, seed=0, scale_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    qweight = ref.pack_int32(q, 4)
    scales = (torch.rand(n, math.ceil(k / 128), generator=g) * 1e-2 + 1e-3).to(scale_dtype)
    return q.to(device), qweight.to(device), scales.to(device)


def _x(m, k, dtype, device=DEV, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2
    if m > 2:
        x[1] = 0
    return x.to(dtype).to(device)


def _static(device=DEV):
    return torch.tensor([0.02], device=device)


def _expected(x, qweight, scales, k, act, bias=None):
    xq, xs = ref.quantize_fp8_ref(x, act, _static(x.device) if act == "tensor_static" else None)
    wd = ref.dequantize_int(qweight, scales.float(), None, None, 4, 128, k)
    return ref.fp8_gemm_ref(xq, xs, act, wd, torch.float32, bias)


def _check(y, y_ref, k, out_dtype, what=""):
    assert torch.isfinite(y).all()
    err = ((y.float() - y_ref).norm() / y_ref.norm().clamp(min=1e-30)).item()
    budget = 2e-6 * math.sqrt(max(k, 128) / 128) if out_dtype == torch.float32 else 8e-3
    assert err < budget, f"{what}: relative error {err:.3g} over budget {budget:.3g}"


def test_repack_layout():
    q, qweight, scales = _weights(24, 300)
    w = w4a8_repack(qweight, scales, 128, 300)
    assert w.qweight.shape == (3, 24, 16) and w.qweight.dtype == torch.int32
    words = w.qweight.permute(1, 0, 2).reshape(24, 48)  # back to [N, K/8] row order
    unpacked = ref.unpack_int32(words, 4, 384)
    assert torch.equal(unpacked[:, :300], q.to(torch.int32))
    assert torch.all(unpacked[:, 300:] == 8)  # K padding is the zero point
    assert w.scales.dtype == torch.float32 and torch.equal(w.scales, scales.float())
    w8 = int4_to_fp8(w)  # the dequant candidate's scratch weight: q - 8 exactly
    assert torch.equal(w8[:, :300].float(), (q - 8).float())


CPU_CASES = [(1, 64, 300, "tensor_static", "small_m"), (3, 96, 256, "token_group", "small_m"),
             (5, 80, 200, "token_group", "triton"), (70, 48, 130, "tensor_static", "triton"),
             (6, 64, 384, "token", "dequant"), (2, 32, 128, "tensor_dynamic", "small_m")]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_w4a8_linear_cpu(case):
    m, n, k, act, cand = case
    _, qweight, scales = _weights(n, k)
    w = w4a8_repack(qweight, scales, 128, k)
    x = _x(m, k, torch.float16)
    bias = torch.randn(n, device=DEV) if m % 2 else None
    y = w4a8_linear(x, w, act, _static() if act == "tensor_static" else None, bias=bias, out_dtype=torch.float32,
                    candidate=cand)
    assert y.shape == (m, n)
    _check(y, _expected(x, qweight, scales, k, act, bias), k, torch.float32)


def test_leading_dims_and_default_candidate():
    _, qweight, scales = _weights(32, 256)
    w = w4a8_repack(qweight, scales, 128, 256)
    x = _x(4, 256, torch.float16)
    assert pick_candidate(w, 4) == "small_m"
    y = w4a8_linear(x.view(2, 2, 256), w, "token_group")
    assert y.shape == (2, 2, 32) and y.dtype == torch.float16
    _check(y.reshape(4, 32), _expected(x, qweight, scales, 256, "token_group"), 256, torch.float16)


def test_errors():
    _, qweight, scales = _weights(32, 256)
    assert "group size" in w4a8_can_implement(64, 32, 256, DEV)[1]
    with pytest.raises(ValueError, match="group size"):
        w4a8_repack(qweight, scales, 64, 256)
    with pytest.raises(ValueError, match="qweight"):
        w4a8_repack(qweight[:, :-1], scales, 128, 256)
    with pytest.raises(ValueError, match="scales"):
        w4a8_repack(qweight, scales[:, :1], 128, 256)
    w = w4a8_repack(qweight, scales, 128, 256)
    with pytest.raises(ValueError, match="input_scale"):
        w4a8_linear(_x(1, 256, torch.float16), w, "tensor_static")
    with pytest.raises(ValueError, match="granularity"):
        w4a8_linear(_x(1, 256, torch.float16), w, "group")
    with pytest.raises(ValueError, match="dtype"):
        w4a8_linear(_x(1, 256, torch.float16).to(torch.float8_e4m3fn), w, "token")


# ---- GPU ---------------------------------------------------------------------------------------------------

GPU_SHAPES = [(1, 4096, 7168), (7, 2112, 7168), (16, 576, 7168), (33, 192, 576), (300, 4096, 4096),
              (1000, 7168, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["tensor_static", "token_group"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_w4a8(shape, act, dtype):
    m, n, k = shape
    _, qweight, scales = _weights(n, k, "cuda", scale_dtype=dtype)
    w = w4a8_repack(qweight, scales, 128, k)
    x = _x(m, k, dtype, "cuda")
    y_ref = _expected(x, qweight, scales, k, act)
    cublas = ["dequant_cublas"] if k % 128 == 0 and m >= 16 else []
    for cand in (["small_m"] if m <= 64 else []) + ["triton", "dequant", None] + cublas:
        y = w4a8_linear(x, w, act, _static("cuda") if act == "tensor_static" else None, candidate=cand)
        assert y.dtype == dtype
        _check(y, y_ref, k, dtype, f"candidate {cand}")


@pytest.mark.gpu
@pytest.mark.parametrize("cand", ["small_m", "triton", "dequant", "dequant_cublas"])
def test_gpu_w4a8_cuda_graph(cand):
    m, n, k = (4 if cand == "small_m" else 96), 2112, 7168
    _, qweight, scales = _weights(n, k, "cuda", scale_dtype=torch.bfloat16)
    w = w4a8_repack(qweight, scales, 128, k)
    x = _x(m, k, torch.bfloat16, "cuda")
    w4a8_linear(x, w, "token_group", candidate=cand)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a8_linear(x, w, "token_group", candidate=cand)
    for seed in (3, 4):
        x.copy_(_x(m, k, torch.bfloat16, "cuda", seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        _check(y, _expected(x, qweight, scales, k, "token_group"), k, torch.bfloat16)
    assert int(w.counters.abs().sum()) == 0
