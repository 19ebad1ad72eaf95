"""fp8 GEMMs (small-M split-K, Triton block GEMM, cuBLAS candidates) vs reference.fp8_gemm_ref.

fp8 x fp8 products are exact in fp32, so kernel and reference differ only in summation order and where the
scales multiply: relative error budget 2e-6 * sqrt(K / 128) for fp32 output in the interpreter, 5e-4 * sqrt(K / 128)
on GPUs (fp8 MMA accumulation; a wrong scale or index is O(1)).
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.kernels import fp8_gemm, fp8_small_m
from lowbit.kernels import reference as ref
from lowbit.kernels.fp8_gemm import (_cublas_block, _k_chunks, _rows_scales, cublas_block_split, fp8_can_implement,
                                     fp8_linear, fp8_repack, pick_candidate)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = (128, 128)


def _weights(n, k, gran, shards, device=DEV, seed=0, block=BLOCK):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    if gran == "tensor":
        s = torch.rand(len(shards), generator=g) * 1e-3 + 1e-4
    elif gran == "channel":
        s = torch.rand(n, generator=g) * 1e-3 + 1e-4
    else:
        rows = sum(math.ceil(x / block[0]) for x in shards)
        s = torch.rand(rows, math.ceil(k / block[1]), generator=g) * 1e-3 + 1e-4
    return w.to(device), s.to(device)


def _x(m, k, dtype, device=DEV, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.linspace(0.1, 3.0, k)
    if m > 2:
        x[1] = 0  # zero row
    return x.to(dtype).to(device)


def _static(device=DEV):
    return torch.tensor([0.01], device=device)


def _expected(x, w, s, gran, shards, act, out_dtype, bias=None, block=BLOCK):
    scale = _static(x.device) if act == "tensor_static" else None
    xq, xs = ref.quantize_fp8_ref(x, act, scale)
    wd = ref.dequantize_fp8(w, s, gran, list(shards), block)
    return ref.fp8_gemm_ref(xq, xs, act, wd, torch.float32, bias)


def _check(y, y_ref, k, out_dtype, what=""):
    assert torch.isfinite(y).all()
    err = ((y.float() - y_ref).norm() / y_ref.norm().clamp(min=1e-30)).item()
    # fp32 out: summation order only in the interpreter; on sm90 the fp8 MMA adds a 128-wide K-block with ~14
    # mantissa bits (fp8_block.py), measured 7e-5 to 9e-5 relative on H100 at K = 256..300
    fp32 = (2e-6 if DEV == "cpu" else 5e-4) * math.sqrt(max(k, 128) / 128)
    budget = fp32 if out_dtype == torch.float32 else 8e-3
    assert err < budget, f"{what}: relative error {err:.3g} over budget {budget:.3g}"


def _run(m, n, k, shards, gran, act, cand, out_dtype=torch.float32, x_dtype=torch.float16, bias=False,
         device=DEV, block=BLOCK):
    w, s = _weights(n, k, gran, shards, device, block=block)
    W = fp8_repack(w, s, gran, shards, block)
    x = _x(m, k, x_dtype, device)
    b = torch.randn(n, device=device).to(out_dtype) if bias else None
    y = fp8_linear(x, W, act, _static(device) if act == "tensor_static" else None, bias=b, out_dtype=out_dtype,
                   candidate=cand)
    assert y.shape == (m, n) and y.dtype == out_dtype
    _check(y, _expected(x, w, s, gran, shards, act, out_dtype, b.float() if bias else None, block), k, out_dtype)


# (M, N, K, shards, weight granularity, activation granularity, candidate): every granularity, every
# activation mode, both Triton kernels; N, K not multiples of 128, M = 1, odd M, fused shards with partial blocks
CPU_CASES = [
    (1, 192, 576, [192], "block", "token_group", "small_m"),
    (5, 200, 300, [72, 128], "block", "token_group", "triton"),
    (3, 200, 300, [72, 128], "block", "tensor_static", "small_m"),
    (1, 96, 256, [32, 64], "tensor", "tensor_static", "small_m"),
    (7, 96, 256, [32, 64], "tensor", "tensor_dynamic", "triton"),
    (2, 80, 200, [80], "channel", "token", "small_m"),
    (9, 80, 200, [80], "channel", "token", "triton"),
    (4, 80, 200, [80], "channel", "tensor_dynamic", "small_m"),
    (70, 64, 130, [64], "channel", "token_group", "triton"),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, (c[0], c[1], c[2], c[4], c[5], c[6]))))
def test_fp8_linear_cpu(case):
    m, n, k, shards, gran, act, cand = case
    _run(m, n, k, shards, gran, act, cand)


def test_small_m_split_k_and_counters_reset():
    n, k = 100, 1000
    w, s = _weights(n, k, "block", [n])
    W = fp8_repack(w, s, "block", [n], BLOCK)
    x = _x(3, k, torch.float16)
    y_ref = _expected(x, w, s, "block", [n], "token_group", torch.float32)
    for _ in range(2):  # the second launch relies on the counters the first one reset
        y = fp8_small_m.fp8_small_m(x, None, fp8_small_m.A_DYN_GROUP, W.weight, W.grid, W.grid_rows, W.counters, n, k,
                                    out_dtype=torch.float32, config=(32, 3, 4, 2))
        _check(y, y_ref, k, torch.float32)
        assert int(W.counters.abs().sum()) == 0


@pytest.mark.parametrize("a_mode", [fp8_small_m.A_DYN_GROUP, fp8_small_m.A_FP8_GROUP, fp8_small_m.A_DYN_TOKEN])
def test_small_m_m_tiles_and_split_k(a_mode):
    """M = 40 over 16- or 32-row M tiles x N tiles x K splits: each (N, M) tile has its own ticket."""
    m, n, k = 40, 48, 300
    act = "token" if a_mode == fp8_small_m.A_DYN_TOKEN else "token_group"
    gran = "channel" if act == "token" else "block"
    w, s = _weights(n, k, gran, [n])
    W = fp8_repack(w, s, gran, [n], BLOCK)
    x = _x(m, k, torch.float16)
    xs = None
    if a_mode == fp8_small_m.A_FP8_GROUP:
        x, xs = ref.quantize_fp8_ref(x, "token_group")
        y_ref = ref.fp8_gemm_ref(x, xs, act, ref.dequantize_fp8(w, s, gran, [n], BLOCK), torch.float32)
    else:
        y_ref = _expected(x, w, s, gran, [n], act, torch.float32)
    w_scale, w_rows = (W.grid, W.grid_rows) if gran == "block" else (W.row_scale, None)

    def run(cfg):
        return fp8_small_m.fp8_small_m(x, xs, a_mode, W.weight, w_scale, w_rows, W.counters, n, k,
                                       out_dtype=torch.float32, config=cfg)

    one_tile = run((64, 1, 4, 2, 64))
    if act == "token":  # in-kernel 1 / scale may move a code one e4m3 step off quantize_fp8_ref (fp8_small_m.py)
        y_ref = one_tile
    else:
        _check(one_tile, y_ref, k, torch.float32)
    for cfg in [(32, 2, 4, 2, 16), (32, 2, 4, 2, 16), (32, 3, 4, 2, 16, 1), (16, 3, 4, 2, 32, 1)]:
        # twice: the second launch relies on the reset counters; PIPE = 1: loads one K-block ahead, partials
        # summed RED = 4 at a time with the fourth masked off
        _check(run(cfg), y_ref, k, torch.float32)
        assert int(W.counters.abs().sum()) == 0


def test_small_m_quantizes_first_above_fused_range():
    from lowbit.kernels.fp8_gemm import fuses_quant

    m, n, k = 72, 32, 256  # above the fused range: quantize_fp8, then the split-K kernel on e4m3 x
    w, s = _weights(n, k, "block", [n])
    W = fp8_repack(w, s, "block", [n], BLOCK)
    assert not fuses_quant(W, "token_group", m) and fuses_quant(W, "token_group", 1)
    x = _x(m, k, torch.bfloat16)
    y = fp8_linear(x, W, "token_group", out_dtype=torch.float32, candidate="small_m")
    _check(y, _expected(x, w, s, "block", [n], "token_group", torch.float32), k, torch.float32)
    with pytest.raises(ValueError, match="M <= 64"):  # one tile holds the per-tensor amax
        fp8_small_m.fp8_small_m(x[:, :k], None, fp8_small_m.A_DYN_TENSOR, W.weight, W.grid, W.grid_rows, W.counters,
                                n, k)
    with pytest.raises(ValueError, match="M <= 256"):
        fp8_linear(_x(300, k, torch.bfloat16), W, "token_group", candidate="small_m")


def test_prequantized_input_bias_and_leading_dims():
    n, k = 64, 256
    w, s = _weights(n, k, "block", [n])
    W = fp8_repack(w, s, "block", [n], BLOCK)
    x = _x(6, k, torch.float32)
    xq, xs = ref.quantize_fp8_ref(x, "token_group")
    b = torch.randn(n, device=DEV)
    y_ref = ref.fp8_gemm_ref(xq, xs, "token_group", ref.dequantize_fp8(w, s, "block", [n], BLOCK), torch.float32, b)
    for cand in ("small_m", "triton"):
        y = fp8_linear(xq.view(2, 3, k), W, "token_group", bias=b, out_dtype=torch.float32, x_scale=xs, candidate=cand)
        assert y.shape == (2, 3, n)
        _check(y.reshape(6, n), y_ref, k, torch.float32)


def test_noncontiguous_input_and_fp16_out():
    n, k = 64, 256
    w, s = _weights(n, k, "channel", [n])
    W = fp8_repack(w, s, "channel", [n])
    x = _x(8, 2 * k, torch.float16)[::2, ::2]  # strided in both dims
    y = fp8_linear(x, W, "token", out_dtype=torch.float16, candidate="small_m")
    _check(y, _expected(x, w, s, "channel", [n], "token", torch.float16), k, torch.float16)


def test_repack_block_rows_per_shard():
    w, s = _weights(200, 300, "block", [72, 128])
    W = fp8_repack(w, s, "block", [72, 128], BLOCK)
    assert W.grid_rows.tolist() == [0] * 72 + [1] * 128
    assert not W.cublas_grid  # shard 0 ends inside a 128-row block
    assert fp8_repack(*_weights(256, 256, "block", [128, 128]), "block", [128, 128], BLOCK).cublas_grid


def test_repack_and_linear_errors():
    w, s = _weights(64, 256, "block", [64])
    with pytest.raises(ValueError, match="shape"):
        fp8_repack(w, s[:, :1], "block", [64], BLOCK)
    with pytest.raises(ValueError, match="shard sizes"):
        fp8_repack(w, s, "block", [32], BLOCK)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_repack(w.float(), s, "block", [64], BLOCK)
    with pytest.raises(ValueError, match="block size"):
        fp8_repack(w, s, "block", [64], (128, 64))
    with pytest.raises(ValueError, match="per-tensor"):
        fp8_repack(w, torch.ones(3, device=DEV), "tensor", [64])
    W = fp8_repack(w, s, "block", [64], BLOCK)
    with pytest.raises(ValueError, match="granularity"):
        fp8_linear(torch.zeros(1, 256, device=DEV), W, "channel")
    with pytest.raises(ValueError, match="K="):
        fp8_linear(torch.zeros(1, 255, device=DEV), W, "token")
    with pytest.raises(ValueError, match="input_scale"):
        fp8_linear(torch.zeros(1, 256, device=DEV), W, "tensor_static")
    with pytest.raises(ValueError, match="candidate"):
        fp8_linear(torch.zeros(1, 256, device=DEV), W, "token", candidate="cutlass")
    assert not fp8_can_implement("group", 64, 64, DEV)[0]
    assert "block size" in fp8_can_implement("block", 64, 64, DEV, (128, 32))[1]


def test_small_m_pdl_config_flag():
    """config[5] (pdl) launches a programmatic dependent on sm90+ GPUs; the interpreter and older GPUs ignore it."""
    n, k = 64, 576
    w, s = _weights(n, k, "block", [n])
    W = fp8_repack(w, s, "block", [n], BLOCK)
    x = _x(2, k, torch.float16)
    y = [fp8_small_m.fp8_small_m(x, None, fp8_small_m.A_DYN_GROUP, W.weight, W.grid, W.grid_rows, W.counters, n, k,
                                 out_dtype=torch.float32, config=(32, 2, 4, 2, 16, pdl)) for pdl in (True, False)]
    _check(y[0], _expected(x, w, s, "block", [n], "token_group", torch.float32), k, torch.float32)
    if DEV == "cpu":
        assert torch.equal(y[0], y[1])


def test_k_chunks_and_split_config():
    assert _k_chunks(7168, 4) == [(0, 2048), (2048, 4096), (4096, 5632), (5632, 7168)]
    assert _k_chunks(1536, 4) == [(0, 512), (512, 1024), (1024, 1536)]  # at most K / 512 pieces
    assert _k_chunks(7168, 1) == [(0, 7168)]
    W = fp8_repack(*_weights(64, 256, "block", [64]), "block", [64], BLOCK)
    assert cublas_block_split(W, 256) == (1, False, False)  # shapes without a measured entry: one call


def test_cublas_block_rows_config_range(monkeypatch):
    """The rows variant exactly inside its configured M ranges (inclusive; null: no upper bound), split_n only in the
    rows + split_n range there; split_k from its buckets either way; the table parsed once per shape."""
    entry = {"cublas_block_split_k": {"64": 4, "256": 2}, "cublas_block_split_n_min_m": 4096,
             "cublas_block_rows_m": [200, 1024], "cublas_block_rows_split_n_m": [2048, None]}
    cfg = {"block": {"shapes": {"192x512": entry, "320x512": {"cublas_block_rows_m": [300, 300]}}}}
    monkeypatch.setattr(fp8_gemm, "load_config", lambda name: cfg if name == "fp8_select" else {})
    fp8_gemm._split_table.cache_clear()
    fp8_gemm._calls_table.cache_clear()
    try:
        W = fp8_repack(*_weights(192, 512, "block", [192]), "block", [192], BLOCK)
        assert W.rows_scales  # made once at load for the configured ranges
        expect = {64: (4, False, False), 199: (2, False, False), 200: (2, False, True), 256: (2, False, True),
                  1024: (1, False, True), 1025: (1, False, False), 2047: (1, False, False), 2048: (1, True, True),
                  1 << 20: (1, True, True)}
        assert {m: cublas_block_split(W, m) for m in expect} == expect
        W2 = fp8_repack(*_weights(320, 512, "block", [320]), "block", [320], BLOCK)
        assert [cublas_block_split(W2, m)[2] for m in (299, 300, 301)] == [False, True, False]
        cfg["block"]["shapes"]["192x512"] = {"cublas_block_rows_m": [200]}
        fp8_gemm._split_table.cache_clear()
        fp8_gemm._calls_table.cache_clear()
        with pytest.raises(ValueError, match="cublas_block_rows_m"):
            cublas_block_split(W, 256)
    finally:
        fp8_gemm._split_table.cache_clear()
        fp8_gemm._calls_table.cache_clear()


def test_small_m_row_scale_table(monkeypatch):
    """Per-tensor / per-channel weights take the "row_scale" table up to its largest M bucket, the main (block-weight)
    table above it and for block weights; a shape without a row entry takes the main table."""
    main = {"1": [64, 8, 4, 3, 64], "16": [64, 4, 4, 3, 64], "64": [128, 2, 8, 3, 64]}
    cfg = {"64x256": main, "row_scale": {"64x256": {"1": [128, 1, 4, 5, 64], "16": [64, 1, 4, 5, 64]}}}
    monkeypatch.setattr(fp8_gemm, "load_config", lambda name: cfg if name == "fp8_small_m" else {})
    got = {(m, row): fp8_gemm.small_m_config(64, 256, m, row_scale=row)[:4] for m in (1, 2, 16, 17, 64)
           for row in (True, False)}
    assert got == {(1, True): (128, 1, 4, 5), (2, True): (64, 1, 4, 5), (16, True): (64, 1, 4, 5),
                   (17, True): (128, 2, 8, 3), (64, True): (128, 2, 8, 3), (1, False): (64, 8, 4, 3),
                   (2, False): (64, 4, 4, 3), (16, False): (64, 4, 4, 3), (17, False): (128, 2, 8, 3),
                   (64, False): (128, 2, 8, 3)}
    cfg["row_scale"] = {}
    assert fp8_gemm.small_m_config(64, 256, 1, row_scale=True)[:4] == (64, 8, 4, 3)


def test_split_n_remainder_scales_made_at_load(monkeypatch):
    """split_n runs the rows past the last whole 128 in the rows form whatever the main call's form, so a weight whose
    shape has a split_n range gets that piece's rows scales at load (inside a CUDA graph capture they would be made,
    uncached, on every replay): each block scale on each of its rows."""
    cfg = {"block": {"shapes": {"200x512": {"cublas_block_split_n_min_m": 1025}, "192x512": {}}}}
    monkeypatch.setattr(fp8_gemm, "load_config", lambda name: cfg if name == "fp8_select" else {})
    fp8_gemm._split_table.cache_clear()
    fp8_gemm._calls_table.cache_clear()
    try:
        w, s = _weights(200, 512, "block", [200])
        W = fp8_repack(w, s, "block", [200], BLOCK)
        assert set(W.rows_scales) == {(128, 200, 0, 512)}
        rs = W.rows_scales[(128, 200, 0, 512)]
        assert rs.shape == (72, 4) and rs.stride() == (1, 72)
        assert torch.equal(rs, s[1:2].expand(72, 4))
        assert cublas_block_split(W, 1024) == (1, False, False) and cublas_block_split(W, 1025) == (1, True, False)
        assert not fp8_repack(*_weights(192, 512, "block", [192]), "block", [192], BLOCK).rows_scales
    finally:
        fp8_gemm._split_table.cache_clear()
        fp8_gemm._calls_table.cache_clear()


def test_cublas_block_calls_table(monkeypatch):
    """cublas_block_calls buckets (smallest max M >= M) decide the whole call form up to their largest M; past it the
    split_k / rows tables apply; the scale slices of every configured form are made at load; a malformed entry is
    an error that names the shape and the bucket."""
    entry = {"cublas_block_calls": {"512": [1, False, True], "128": [2, False, False]},
             "cublas_block_split_k": {"64": 4, "2048": 2}, "cublas_block_rows_m": [2048, None]}
    cfg = {"block": {"shapes": {"192x1024": entry}}}
    monkeypatch.setattr(fp8_gemm, "load_config", lambda name: cfg if name == "fp8_select" else {})
    fp8_gemm._split_table.cache_clear()
    fp8_gemm._calls_table.cache_clear()
    try:
        W = fp8_repack(*_weights(192, 1024, "block", [192]), "block", [192], BLOCK)
        expect = {16: (2, False, False), 128: (2, False, False), 129: (1, False, True), 512: (1, False, True),
                  513: (2, False, False), 2048: (2, False, True), 4096: (1, False, True)}
        assert {m: cublas_block_split(W, m) for m in expect} == expect
        assert (0, 192, 0, 1024) in W.rows_scales and (0, 512) in W.grid_chunks  # made at load
        cfg["block"]["shapes"]["192x1024"] = {"cublas_block_calls": {"64": [0, False, True]}}
        fp8_gemm._calls_table.cache_clear()
        with pytest.raises(ValueError, match=r"192x1024\].cublas_block_calls\['64'\]"):
            cublas_block_split(W, 32)
    finally:
        fp8_gemm._split_table.cache_clear()
        fp8_gemm._calls_table.cache_clear()


def test_rows_scales_layout():
    """One scale per weight row per 128 columns (its block's), column-major per row slice and K piece, cached."""
    n, k, shards = 320, 1024, [256, 64]
    W = fp8_repack(*_weights(n, k, "block", shards), "block", shards, BLOCK)
    per_row = W.grid[W.grid_rows.long()]  # [N, K/128]
    for n0, n1, k0, k1 in [(0, n, 0, k), (0, 256, 0, k), (256, n, 0, k), (0, n, 512, 1024)]:
        s = _rows_scales(W, n0, n1, k0, k1)
        assert s.shape == (n1 - n0, (k1 - k0) // 128) and s.stride() == (1, n1 - n0)
        assert torch.equal(s, per_row[n0:n1, k0 // 128:k1 // 128])
        assert _rows_scales(W, n0, n1, k0, k1) is s


def test_pick_candidate_by_m():
    W = fp8_repack(*_weights(64, 256, "block", [64]), "block", [64], BLOCK)
    assert pick_candidate(W, "token_group", 1) == "small_m"
    if DEV == "cpu":
        assert pick_candidate(W, "token_group", 4096) == "triton"


# ---- GPU: hardware paths, every scheme x candidate, odd shapes, bf16/fp16, CUDA graphs -------------------

GPU_SHAPES = [(1, 2112, 7168, [1536, 576]), (7, 576, 7168, [576]), (16, 4096, 7168, [4096]),
              (33, 192, 576, [192]), (300, 2112, 7168, [1536, 576]), (1000, 7168, 2048, [7168])]
GPU_SCHEMES = [("block", "token_group"), ("channel", "token"), ("tensor", "tensor_static"),
               ("tensor", "tensor_dynamic"), ("block", "tensor_static")]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
@pytest.mark.parametrize("scheme", GPU_SCHEMES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp8_linear(shape, scheme, out_dtype):
    m, n, k, shards = shape
    gran, act = scheme
    w, s = _weights(n, k, gran, shards, "cuda")
    W = fp8_repack(w, s, gran, shards, BLOCK)
    x = _x(m, k, out_dtype, "cuda")
    y_ref = _expected(x, w, s, gran, shards, act, out_dtype)
    cands = ["triton"] + (["small_m"] if m <= 64 else [])
    if gran != "block" and act != "token_group" and n % 16 == 0 and k % 16 == 0 and (
            out_dtype == torch.bfloat16 or (W.tensor_scale is not None and act != "token")):
        cands.append("cublas")
    if gran == "block" and act == "token_group" and W.cublas_grid and k % 512 == 0 and m >= 16:
        cands.append("cublas_block")
    cands.append(None)  # the selection helper's choice
    for cand, tma in [(c, None) for c in cands] + [("triton", True)]:
        y = fp8_linear(x, W, act, _static("cuda") if act == "tensor_static" else None, out_dtype=out_dtype,
                       candidate=cand, tma=tma)
        _check(y, y_ref, k, out_dtype, f"candidate {cand} tma {tma}")


@pytest.mark.gpu
@pytest.mark.parametrize("cand", ["small_m", "triton", "cublas_block", "cublas"])
def test_gpu_cuda_graph(cand):
    gran, act = ("channel", "token") if cand == "cublas" else ("block", "token_group")
    m = 4 if cand == "small_m" else 64
    n, k = 2112, 7168
    w, s = _weights(n, k, gran, [n], "cuda")
    W = fp8_repack(w, s, gran, [n], BLOCK)
    x = _x(m, k, torch.bfloat16, "cuda")
    fp8_linear(x, W, act, candidate=cand)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_linear(x, W, act, candidate=cand)
    for seed in (3, 4):  # replays see new inputs; split-K counters must be back at zero each time
        x.copy_(_x(m, k, torch.bfloat16, "cuda", seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        _check(y, _expected(x, w, s, gran, [n], act, torch.bfloat16), k, torch.bfloat16)
    assert int(W.counters.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("m,split_k,split_n", [(16, 2, False), (64, 4, False), (256, 7, False), (300, 1, True),
                                               (2048, 1, True), (1000, 3, False)])
def test_gpu_cublas_block_splits(m, split_k, split_n):
    """K in pieces on side streams summed in fp32, or the N rows past the last whole 128 on a side stream; eager and
    replayed from a CUDA graph (fork/join branches) with new inputs, bias included."""
    from lowbit.kernels.quant_act import quantize_fp8

    n, k, shards = 2112, 7168, [1536, 576]
    w, s = _weights(n, k, "block", shards, "cuda")
    W = fp8_repack(w, s, "block", shards, BLOCK)
    b = torch.randn(n, device="cuda").to(torch.bfloat16)
    wd = ref.dequantize_fp8(w, s, "block", shards, BLOCK)
    x = _x(m, k, torch.bfloat16, "cuda")
    xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
    y = _cublas_block(xq, xs, W, b, torch.bfloat16, split_k, split_n)
    _check(y, ref.fp8_gemm_ref(xq, xs, "token_group", wd, torch.float32, b.float()), k, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = _cublas_block(xq, xs, W, b, torch.bfloat16, split_k, split_n)
    xq2, xs2 = quantize_fp8(_x(m, k, torch.bfloat16, "cuda", seed=5), "token_group", column_major_scales=True)
    xq.copy_(xq2)
    xs.copy_(xs2)
    graph.replay()
    torch.cuda.synchronize()
    _check(yg, ref.fp8_gemm_ref(xq, xs, "token_group", wd, torch.float32, b.float()), k, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n,shards", [(2112, [1536, 576]), (4096, [4096])], ids=["2112", "4096"])
@pytest.mark.parametrize("m,split_k,split_n,bias", [(2048, 1, False, False), (300, 1, True, True),
                                                    (256, 2, False, True), (64, 4, False, False)])
def test_gpu_cublas_block_rows(n, shards, m, split_k, split_n, bias):
    """rows (BlockWise1x128 weight scales, one per row per 128 columns) is the 128x128 call's math: both against the
    reference, N a multiple of 128 and not, with split_n / split_k and bias; then replayed from a CUDA graph captured
    on a fresh weight (its scales made inside the capture, not cached) with new inputs."""
    from lowbit.kernels.quant_act import quantize_fp8

    k = 7168
    w, s = _weights(n, k, "block", shards, "cuda")
    W = fp8_repack(w, s, "block", shards, BLOCK)
    b = torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None
    wd = ref.dequantize_fp8(w, s, "block", shards, BLOCK)
    x = _x(m, k, torch.bfloat16, "cuda")
    xq, xs = quantize_fp8(x, "token_group", column_major_scales=True)
    y_ref = ref.fp8_gemm_ref(xq, xs, "token_group", wd, torch.float32, b.float() if bias else None)
    y128 = _cublas_block(xq, xs, W, b, torch.bfloat16, split_k, split_n)
    y = _cublas_block(xq, xs, W, b, torch.bfloat16, split_k, split_n, rows=True)
    _check(y128, y_ref, k, torch.bfloat16, "128x128")
    _check(y, y_ref, k, torch.bfloat16, "rows")
    _check(y, y128.float(), k, torch.bfloat16, "rows vs 128x128")
    assert W.rows_scales
    W2 = fp8_repack(w, s, "block", shards, BLOCK)
    W2.rows_scales.clear()  # (fp8_repack makes them where fp8_select.json configures rows for this shape)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = _cublas_block(xq, xs, W2, b, torch.bfloat16, split_k, split_n, rows=True)
    assert not W2.rows_scales
    xq2, xs2 = quantize_fp8(_x(m, k, torch.bfloat16, "cuda", seed=5), "token_group", column_major_scales=True)
    xq.copy_(xq2)
    xs.copy_(xs2)
    graph.replay()
    torch.cuda.synchronize()
    _check(yg, ref.fp8_gemm_ref(xq, xs, "token_group", wd, torch.float32, b.float() if bias else None), k,
           torch.bfloat16, "rows graph")


@pytest.mark.gpu
def test_gpu_selection_without_cublas_block_scaling(monkeypatch):
    """On an sm89 device (no cuBLAS block scaling) block weights keep small_m up to NO_CUBLAS_BLOCK_SMALL_M_MAX,
    then the Triton block GEMM; on this GPU the measured table's cuBLAS block-wise pick at M = 64 stays."""
    n, k, shards = 2112, 7168, [2112]
    w, s = _weights(n, k, "block", shards, "cuda")
    W = fp8_repack(w, s, "block", shards, BLOCK)
    native = [pick_candidate(W, "token_group", m) for m in (32, 64)]
    assert native == ["small_m", "cublas_block"] or not fp8_gemm.cublas_block_scaling(W.weight.device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert [pick_candidate(W, "token_group", m) for m in (64, 128, 129, 2048)] == ["small_m", "small_m", "triton",
                                                                                    "triton"]
    x = _x(100, k, torch.bfloat16, "cuda")
    _check(fp8_linear(x, W, "token_group"), _expected(x, w, s, "block", shards, "token_group", torch.bfloat16), k,
           torch.bfloat16, "sm89 pick")


@pytest.mark.gpu
def test_gpu_selection_runs_rows(monkeypatch):
    """fp8_linear's own choice inside a configured rows range: cuBLAS block-wise with rows (+ split_n), from bf16 x."""
    n, k, shards, m = 2112, 7168, [1536, 576], 1024
    cfg = {"block": {"shapes": {f"{n}x{k}": {"cublas_block_min_m": 129, "cublas_block_rows_split_n_m": [512, 2048]}}}}
    monkeypatch.setattr(fp8_gemm, "load_config", lambda name: cfg if name == "fp8_select" else {})
    fp8_gemm._split_table.cache_clear()
    fp8_gemm._calls_table.cache_clear()
    try:
        w, s = _weights(n, k, "block", shards, "cuda")
        W = fp8_repack(w, s, "block", shards, BLOCK)
        assert pick_candidate(W, "token_group", m) == "cublas_block" and cublas_block_split(W, m) == (1, True, True)
        assert set(W.rows_scales) == {(0, 2048, 0, k), (2048, n, 0, k)}  # made at load
        x = _x(m, k, torch.bfloat16, "cuda")
        _check(fp8_linear(x, W, "token_group"), _expected(x, w, s, "block", shards, "token_group", torch.bfloat16), k,
               torch.bfloat16, "selected rows")
    finally:
        fp8_gemm._split_table.cache_clear()
        fp8_gemm._calls_table.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2112, 7168), (16, 576, 576), (5, 200, 300)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_small_m_pdl_back_to_back_graph(shape):
    """Programmatic dependent launches replayed back to back from one graph, sharing the split-K counters."""
    m, n, k = shape
    w, s = _weights(n, k, "block", [n], "cuda")
    W = fp8_repack(w, s, "block", [n], BLOCK)
    x = _x(m, k, torch.bfloat16, "cuda")
    cfg = (64, 4, 4, 3, 64, True)

    def call():
        return fp8_small_m.fp8_small_m(x, None, fp8_small_m.A_DYN_GROUP, W.weight, W.grid, W.grid_rows, W.counters,
                                       n, k, config=cfg)

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [call() for _ in range(3)]
    x.copy_(_x(m, k, torch.bfloat16, "cuda", seed=7))
    graph.replay()
    torch.cuda.synchronize()
    y_ref = _expected(x, w, s, "block", [n], "token_group", torch.bfloat16)
    for y in ys:
        _check(y, y_ref, k, torch.bfloat16, "pdl")
    assert int(W.counters.abs().sum()) == 0
