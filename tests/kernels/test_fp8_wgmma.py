"""fp8 block-scaled Gluon GEMM (fp8_wgmma.py, sm90) vs reference.fp8_gemm_ref: 1 x 128 activation groups, 128 x 128
weight blocks; error budget as test_fp8_gemm.py (fp8 MMA accumulation over each 128-wide K-block)."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import reference as ref
from lowbit.kernels.fp8_gemm import fp8_repack
from tests.kernels.test_fp8_gemm import BLOCK, _check, _weights, _x


def _sm90():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm90 GPU (wgmma, TMA)")


def _case(m, n, k, shards, seed=0):
    w, s = _weights(n, k, "block", shards, "cuda", seed=seed)
    W = fp8_repack(w, s, "block", shards, BLOCK)
    x = _x(m, k, torch.bfloat16, "cuda", seed=seed + 1)
    xq, xs = ref.quantize_fp8_ref(x, "token_group")
    y_ref = ref.fp8_gemm_ref(xq, xs, "token_group", ref.dequantize_fp8(w, s, "block", list(shards), BLOCK),
                             torch.float32)
    return W, xq, xs, y_ref


CONFIGS = [{}, {"BLOCK_M": 64, "num_warps": 4}, {"OVERLAP": True}, {"num_stages": 3, "TAIL_SPLIT": False},
           {"TAIL_SPLIT": True, "TAIL_SLOTS": 3}, {"WS": True}, {"WS": True, "TAIL_SPLIT": True, "TAIL_SLOTS": 3}]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("m,n,k,shards", [(300, 640, 1024, [640]), (129, 2112, 7168, [1536, 576]),
                                          (64, 256, 128, [256]), (517, 384, 1040, [384]), (1, 128, 384, [128])])
def test_fp8_wgmma_vs_reference(cfg, m, n, k, shards):
    """Odd M (partial token tiles), N past the last whole weight block, K not a multiple of 128 (TMA zero fill; the
    partial last block's scale still applies), fused shards on 128-row boundaries; tail split with a small slot count
    so that small grids cut tiles over K (workspace, tickets)."""
    _sm90()
    from lowbit.kernels.fp8_wgmma import fp8_wgmma_gemm, fp8_wgmma_ok

    W, xq, xs, y_ref = _case(m, n, k, shards)
    assert fp8_wgmma_ok(xq, W.weight, W.cublas_grid)
    for xs_in in (xs, xs.t().contiguous().t()):  # row-major and column-major (quantize_fp8's) activation scales
        for _ in range(2):  # the second launch relies on the split tickets the first one reset
            y = fp8_wgmma_gemm(xq, xs_in, W.weight, W.grid, W.counters, out_dtype=torch.float32, config=cfg)
            _check(y, y_ref, k, torch.float32, f"{cfg} M={m}")
        assert int(W.counters.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fp8_wgmma_bias_dtypes_and_graph(out_dtype, ws):
    _sm90()
    from lowbit.kernels.fp8_wgmma import fp8_wgmma_gemm

    m, n, k = 1000, 1152, 2048
    W, xq, xs, y_ref = _case(m, n, k, [n], seed=3)
    bias = torch.randn(n, device="cuda").to(out_dtype)
    y_ref = y_ref + bias.float()
    cfg = {"TAIL_SPLIT": True, "TAIL_SLOTS": 7, "WS": ws}
    _check(fp8_wgmma_gemm(xq, xs, W.weight, W.grid, W.counters, bias, out_dtype, cfg), y_ref, k, out_dtype, "eager")
    fp8_wgmma_gemm(xq, xs, W.weight, W.grid, W.counters, bias, out_dtype, cfg)  # compiled before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fp8_wgmma_gemm(xq, xs, W.weight, W.grid, W.counters, bias, out_dtype, cfg)
    for _ in range(3):
        y.zero_()
        g.replay()
        torch.cuda.synchronize()
        _check(y, y_ref, k, out_dtype, "graph replay")
    assert int(W.counters.abs().sum()) == 0


def test_fp8_wgmma_rejects_other_tiles():
    from lowbit.kernels.fp8_wgmma import fp8_wgmma_gemm

    x = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="BLOCK_N 128"):
        fp8_wgmma_gemm(x, torch.ones(4, 2), x, torch.ones(1, 2), torch.zeros(4, dtype=torch.int32),
                       config={"BLOCK_M": 256, "num_warps": 8})
