"""w4a16 kernels vs the pure-torch reference (lowbit/kernels/reference.py).

CPU: the Triton interpreter, fp16 only (its bf16 tl.dot is not trustworthy), small shapes. GPU (marker gpu):
fp16 and bf16, the option matrix, odd shapes, large M, strided input, CUDA graphs, and the backend.
Budget: the fp32-accumulated result vs the fp32 reference, tolerance growing with sqrt(K).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lowbit.kernels import w4a16_tune as tune
from lowbit.kernels.reference import dequantize_int, pack_int32, w4a16_gemm_ref
from lowbit.kernels.w4a16 import w4a16_gemm
from lowbit.kernels.w4a16_dequant import w4a16_dequantize
from lowbit.kernels.w4a16_layout import w4a16_can_implement, w4a16_repack, w4a16_unpack

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def make(n, k, group, sym, act_order, bits=4, seed=0, device=DEV):
    """Random canonical int weights: (qweight, scales fp32 (fp16-exact), zeros | None, g_idx | None, G)."""
    gen = torch.Generator().manual_seed(seed)
    g = group if group > 0 else k
    ng = math.ceil(k / g)
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(n, ng, generator=gen) * 0.02 / 2 ** (bits - 4) + 1e-3).half().float()
    zeros = None if sym else torch.randint(0, 2**bits, (n, ng), generator=gen, dtype=torch.int32)
    g_idx = None
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // g).int()
    to = (lambda t: None if t is None else t.to(device))
    return to(pack_int32(q, bits)), to(scales), to(zeros), to(g_idx), g


def check(x, qw, scales, zeros, g_idx, bits, g, bias=None, config=None, w=None):
    w = w or w4a16_repack(qw, scales, zeros, g_idx, bits, g, x.shape[-1])
    y = w4a16_gemm(x, w, bias, config=config)
    ref = w4a16_gemm_ref(x, qw, scales, zeros, g_idx, bits, g, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    scale = ref.float().abs().max().item() + 1e-3
    tol = (2e-3 if x.dtype == torch.float16 else 1e-2) * scale * max(1.0, math.sqrt(x.shape[-1] / 256))
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= tol, f"max abs err {err:.4g} > {tol:.4g} (|ref| max {scale:.3g})"
    return y


# ---- CPU (interpreter) -------------------------------------------------------------------------

CPU_CASES = [  # M, N, K, G (0: per-channel), sym, act_order, bias
    (1, 80, 256, 128, True, False, False),
    (3, 72, 576, 128, False, False, True),  # SmolLM2: K=576, G=128 -> partial last group
    (17, 64, 200, 32, True, False, False),
    (3, 96, 320, 64, False, False, False),
    (1, 64, 300, 0, True, False, True),
    (17, 80, 384, 128, True, True, False),
    (3, 64, 256, 32, False, True, True),
]


@pytest.mark.parametrize("m,n,k,g,sym,act,bias", CPU_CASES)
def test_gemm_matches_reference(m, n, k, g, sym, act, bias):
    qw, s, z, gi, g = make(n, k, g, sym, act, seed=m + n + k)
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    b = torch.randn(n, device=DEV, dtype=torch.float16) if bias else None
    check(x, qw, s, z, gi, 4, g, b)


@pytest.mark.parametrize("config", [
    {"path": "fused", "BLOCK_N": 64, "BLOCK_M": 16, "SPLIT_K": 3, "SCALE_AFTER": True},  # split-K + lock reduce
    {"path": "fused", "BLOCK_N": 64, "BLOCK_M": 32, "SPLIT_K": 2, "SCALE_AFTER": False},  # pre-scaled operand
    {"path": "dequant"},
])
@pytest.mark.parametrize("act", [False, True])
def test_paths_match_reference(config, act):
    qw, s, z, gi, g = make(72, 456, 64, False, act, seed=3)
    x = torch.randn(5, 456, device=DEV, dtype=torch.float16)
    check(x, qw, s, z, gi, 4, g, torch.randn(72, device=DEV, dtype=torch.float16), config)


def test_dequant_path_in_row_chunks(monkeypatch):
    import lowbit.kernels.w4a16_dequant as mod

    monkeypatch.setattr(mod, "DEQUANT_CHUNK_ELEMS", 300 * 256)  # 600 rows x 256 -> 2 chunks of 512 and 88 rows
    qw, s, z, gi, g = make(600, 256, 64, False, True, seed=5)
    x = torch.randn(3, 256, device=DEV, dtype=torch.float16)
    check(x, qw, s, z, gi, 4, g, torch.randn(600, device=DEV, dtype=torch.float16), {"path": "dequant"})


@pytest.mark.parametrize("overlap", [False, True])
def test_dequant_path_in_config_chunks(overlap):
    """"chunks" N-chunks through one reused buffer (two with "overlap": a side stream on the GPU, none on the CPU)."""
    qw, s, z, gi, g = make(600, 256, 64, False, True, seed=6)
    x = torch.randn(3, 256, device=DEV, dtype=torch.float16)
    cfg = {"path": "dequant", "chunks": 3, "overlap": overlap}  # 3 chunks of 256, 256 and 88 rows
    assert check(x, qw, s, z, gi, 4, g, torch.randn(600, device=DEV, dtype=torch.float16), cfg).shape == (3, 600)


def test_noncontiguous_and_batched_input():
    qw, s, z, gi, g = make(64, 256, 128, True, False)
    base = torch.randn(2, 3, 512, device=DEV, dtype=torch.float16)
    x = base[..., ::2]  # [2, 3, 256], stride 2 along K
    y = check(x, qw, s, z, gi, 4, g)
    assert y.shape == (2, 3, 64)


def test_int8_weights():
    qw, s, z, gi, g = make(64, 192, 64, False, False, bits=8)
    check(torch.randn(3, 192, device=DEV, dtype=torch.float16), qw, s, z, gi, 8, g)


@pytest.mark.parametrize("k,g,sym,act", [(576, 128, False, False), (200, 32, True, False), (300, 0, True, False),
                                         (256, 64, False, True)])
def test_repack_round_trip_is_exact(k, g, sym, act):
    qw, s, z, gi, g = make(40, k, g, sym, act)
    w = w4a16_repack(qw, s, z, gi, 4, g, k)
    q, s2, z2 = w4a16_unpack(w)
    assert torch.equal(pack_int32(q, 4), qw)
    assert torch.equal(s2.float(), s)
    assert (z2 is None and z is None) or torch.equal(z2, z)
    deq = w4a16_dequantize(w, torch.float16)  # the dequant kernel, canonical column order
    assert torch.equal(deq, dequantize_int(qw, s, z, gi, 4, g, k).half())


def test_errors_name_the_value_and_the_supported_set():
    qw, s, z, gi, g = make(32, 128, 128, True, False)
    w = w4a16_repack(qw, s, z, gi, 4, g, 128)
    with pytest.raises(ValueError, match="float32.*supported"):
        w4a16_gemm(torch.randn(2, 128, device=DEV), w)
    with pytest.raises(ValueError, match="must end in K=128"):
        w4a16_gemm(torch.randn(2, 64, device=DEV, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="bias must be"):
        w4a16_gemm(torch.randn(2, 128, device=DEV, dtype=torch.float16), w, torch.zeros(7, device=DEV))
    with pytest.raises(ValueError, match="group size 16 .* supported"):
        w4a16_repack(*make(32, 128, 16, True, False)[:4], 4, 16, 128)
    with pytest.raises(ValueError, match="bits=3 .* supported"):
        w4a16_repack(qw, s, z, gi, 3, g, 128)
    ok, reason = w4a16_can_implement(4, 96, 384, 32, False, False, torch.float16, DEV)
    assert not ok and "96" in reason
    assert w4a16_gemm(torch.randn(0, 128, device=DEV, dtype=torch.float16), w).shape == (0, 32)


def test_config_lookup(tmp_path, monkeypatch):
    qw, s, z, gi, g = make(64, 256, 128, True, False)
    w = w4a16_repack(qw, s, z, gi, 4, g, 256)
    assert [tune.bucket(m) for m in (1, 3, 16, 17, 20000)] == [1, 4, 16, 32, 16384]
    assert tune.shape_key(w) == "64x256:int4"
    assert tune.nearest({"1": {"a": 1}, "16": {"a": 16}, "4096": {"a": 4}}, 4)["a"] == 1
    assert tune.nearest({"1": {"a": 1}, "16": {"a": 16}, "4096": {"a": 4}}, 8)["a"] == 16
    assert tune.nearest({"1": {"a": 1}, "16": {"a": 16}, "4096": {"a": 4}}, 16384)["a"] == 4
    sm90 = DEV == "cuda" and torch.cuda.get_device_capability()[0] == 9  # (Hopper: the wgmma kernel for mid M)
    for m in (1, 16, 64, 128, 4096):
        cfg = tune.heuristic(w, m, DEV)
        assert cfg["path"] in ("fused", "dequant") + (("wgmma",) if sm90 else ())
    for m in (1, 64, 1024):
        assert tune.candidates(w, m, DEV)
    fused = {"path": "fused", "BLOCK_N": 64, "BLOCK_M": 16, "SPLIT_K": 1, "SCALE_AFTER": True}
    times = iter([2e-3, 1e-3])  # the second candidate "measures" faster
    timer = lambda fn: (fn(), next(times))[1]  # noqa: E731
    best = tune.autotune(w, 4, torch.float16, DEV, [fused, {"path": "dequant"}], timer=timer)
    assert best == {"path": "dequant", "us": 1.0}
    tune.save_user_config("testgpu", tune.shape_key(w), 4, best)  # $LOWBIT_CACHE is a temp dir in tests
    tune.load_table.cache_clear()
    assert tune.load_table("testgpu")["64x256:int4"]["4"]["path"] == "dequant"


def test_table_alias_fills_missing_shapes(tmp_path, monkeypatch):
    """An H200 uses its own entries, and the H100 table's for the shapes its own table lacks (whole, not per bucket)."""
    from lowbit.kernels import w4a16_tune as tune

    for gpu, configs in (("h100", {"1x1:int4": {"1": {"path": "h100"}}, "2x2:int4": {"1": {"path": "h100"}}}),
                         ("h200", {"1x1:int4": {"16": {"path": "h200"}}})):
        (tmp_path / f"w4a16_{gpu}.json").write_text(json.dumps({"configs": configs}))
    monkeypatch.setattr(tune, "CONFIG_DIR", str(tmp_path))
    tune.load_table.cache_clear()
    try:
        table = tune.load_table("h200")
        assert table["1x1:int4"] == {"16": {"path": "h200"}}
        assert table["2x2:int4"] == {"1": {"path": "h100"}}
        assert set(tune.load_table("h100")) == {"1x1:int4", "2x2:int4"}
    finally:
        tune.load_table.cache_clear()


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("m,n,k,g,sym,act", [(5, 80, 256, 128, False, False), (17, 64, 300, 0, True, False),
                                             (9, 72, 384, 128, True, True)])
def test_tma_path_matches_reference(swap, m, n, k, g, sym, act):
    qw, s, z, gi, g = make(n, k, g, sym, act, seed=m + n)
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    cfg = {"path": "tma", "BLOCK_N": 64, "BLOCK_M": 16 if swap else 32, "SWAP": swap, "num_warps": 4, "num_stages": 2}
    check(x, qw, s, z, gi, 4, g, torch.randn(n, device=DEV, dtype=torch.float16), cfg)


def test_tma_path_strided_input():
    qw, s, z, gi, g = make(64, 256, 128, True, False)
    x = torch.randn(2, 5, 512, device=DEV, dtype=torch.float16)[..., 1::2]  # K stride 2, base offset by one element
    cfg = {"path": "tma", "BLOCK_N": 64, "BLOCK_M": 16, "SWAP": True, "num_warps": 4, "num_stages": 2}
    assert check(x, qw, s, z, gi, 4, g, config=cfg).shape == (2, 5, 64)


def test_large_m_paths_fall_back_where_they_cannot_run():
    """8-bit or G < 128 weights (and, off sm90, every weight) take the heuristic's path for a wgmma/tma entry."""
    qw, s, z, gi, g = make(64, 192, 64, False, False, bits=8)
    x = torch.randn(3, 192, device=DEV, dtype=torch.float16)
    for cfg in ({"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 128, "RS": True}, {"path": "tma", "BLOCK_N": 64,
                                                                               "BLOCK_M": 16}):
        check(x, qw, s, z, gi, 8, g, config=cfg)
    if not CUDA:
        qw, s, z, gi, g = make(64, 256, 128, True, False)
        check(torch.randn(3, 256, dtype=torch.float16), qw, s, z, gi, 4, g,
              config={"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 128})


# ---- GPU ---------------------------------------------------------------------------------------

GPU_OPTIONS = [  # N, K, G, sym, act_order
    (4096, 4096, 128, True, False),
    (1000, 576, 128, False, False),
    (3000, 1000, 32, False, False),
    (2048, 2048, 64, True, False),
    (1536, 2112, 0, True, False),
    (2048, 1024, 128, False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,g,sym,act", GPU_OPTIONS)
def test_gpu_option_matrix(dtype, n, k, g, sym, act):
    qw, s, z, gi, g = make(n, k, g, sym, act)
    w = w4a16_repack(qw, s, z, gi, 4, g, k)
    for m in (1, 7, 300) if (n, k) != (4096, 4096) else (1, 7, 33, 64, 300):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        check(x, qw, s, z, gi, 4, g, torch.randn(n, device="cuda", dtype=dtype) if m == 7 else None, w=w)
    check(x, qw, s, z, gi, 4, g, torch.randn(n, device="cuda", dtype=dtype), {"path": "dequant"}, w=w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_m_and_every_path(dtype):
    qw, s, z, gi, g = make(2048, 4096, 128, False, False)
    w = w4a16_repack(qw, s, z, gi, 4, g, 4096)
    x = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    check(x, qw, s, z, gi, 4, g, w=w)
    xs = x[:64]
    small, large = tune.candidates(w, 16, "cuda"), tune.candidates(w, 4096, "cuda")
    mid = {"path": "fused", "BLOCK_N": 128, "BLOCK_M": 128, "SPLIT_K": 3, "SCALE_AFTER": False, "num_warps": 8,
           "num_stages": 3}
    for cfg in small[:2] + small[-2:] + large + [mid]:
        check(xs, qw, s, z, gi, 4, g, config=cfg, w=w)
    check(x[:200], qw, s, z, gi, 4, g, config=mid, w=w)


@pytest.mark.gpu
def test_gpu_int8_and_strided_input():
    qw, s, z, gi, g = make(1024, 2048, 128, False, False, bits=8)
    x = torch.randn(9, 4096, device="cuda", dtype=torch.bfloat16)[:, ::2]
    check(x, qw, s, z, gi, 8, g)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    qw, s, z, gi, g = make(4096, 4096, 128, True, False)
    w = w4a16_repack(qw, s, z, gi, 4, g, 4096)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    cfg = {"path": "fused", "BLOCK_N": 64, "BLOCK_M": 16, "SPLIT_K": 8, "SCALE_AFTER": True, "num_warps": 4,
           "num_stages": 4}
    w4a16_gemm(x, w, config=cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_gemm(x, w, config=cfg)
    for seed in range(3):  # the split-K counters must be back at zero after each replay
        x.copy_(torch.randn(4, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        ref = w4a16_gemm_ref(x, qw, s, z, gi, 4, g)
        assert (y.float() - ref.float()).abs().max().item() < 2e-2 * ref.float().abs().max().item()
    assert int(w.locks.abs().sum()) == 0


def _require_sm90():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma / TMA kernels are sm90 paths")


def _gpu_case(m, n, k, g, sym, act, bias, dtype):
    """Canonical weights, their repack, x [m, k] and an optional bias on the GPU."""
    qw, s, z, gi, g = make(n, k, g, sym, act)
    w = w4a16_repack(qw, s, z, gi, 4, g, k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    return qw, s, z, gi, g, w, x, torch.randn(n, device="cuda", dtype=dtype) if bias else None


LARGE_M_CONFIGS = [  # the sm90 large-M kernels: Gluon wgmma (A in registers / in shared memory) and Triton TMA
    {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 128, "num_warps": 8, "num_stages": 4, "RS": True},
    {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 256, "num_warps": 8, "num_stages": 3, "RS": True},
    {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 8, "num_stages": 4, "RS": True},
    {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 128, "num_warps": 8, "num_stages": 3, "RS": False},
    {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 256, "num_warps": 8, "num_stages": 2, "RS": False},
    {"path": "tma", "BLOCK_N": 128, "BLOCK_M": 128, "SWAP": True, "num_warps": 8, "num_stages": 3},
]
SPLIT_CONFIGS = [  # wgmma split-K (fp32 partials, the tile's last CTA reduces); K = 1000: 8 blocks, a ragged last split
    {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 128, "num_warps": 8, "num_stages": 4, "RS": True, "SPLIT_K": 3},
    {"path": "wgmma", "BLOCK_N": 64, "BLOCK_M": 64, "num_warps": 4, "num_stages": 4, "RS": True, "SPLIT_K": 4},
    {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": 256, "num_warps": 8, "num_stages": 3, "RS": True, "SPLIT_K": 2},
]
SMALL_TILE = {"path": "wgmma", "BLOCK_N": 64, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "RS": True}  # 1 warpgroup



def test_cta_slots_follow_shared_memory():
    """Two one-warpgroup CTAs share an SM only where both fit its shared memory (64 x 128 tiles on 4 stages take
    ~148 KB: one per SM); 128-row tiles (two warpgroups) always one."""
    from lowbit.kernels.w4a16_wgmma import _slots, tail_split

    sms = 4  # w4a16_tune.num_sms off the GPU
    assert _slots(_wg(64, 128, 4), "cpu") == sms
    assert _slots(_wg(64, 128, 3), "cpu") == 2 * sms
    assert _slots(_wg(64, 64, 4), "cpu") == 2 * sms
    assert _slots(_wg(128, 64, 3), "cpu") == sms
    # 10 tiles on 4 one-CTA SMs: 2 waves and 2 tiles, split 2 ways to fill the third wave's 4 slots
    assert tail_split(10, 28, _wg(64, 128, 4, TAIL_SPLIT=True), "cpu") == (8, 2)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,g,sym,act,bias", [(300, 1000, 1152, 128, False, False, True),
                                                  (257, 1536, 2112, 0, True, False, False),
                                                  (129, 2048, 1024, 128, True, True, True),
                                                  (77, 3000, 1000, 128, False, False, False),
                                                  (1, 256, 256, 256, True, False, True),
                                                  (1024, 4096, 4096, 128, True, False, False)])
def test_gpu_large_m_kernels(dtype, m, n, k, g, sym, act, bias):
    _require_sm90()
    qw, s, z, gi, g, w, x, b = _gpu_case(m, n, k, g, sym, act, bias, dtype)
    for cfg in LARGE_M_CONFIGS:
        for _ in range(2):  # repeated launches: an operand race would not show every time
            check(x, qw, s, z, gi, 4, g, b, cfg, w=w)


@pytest.mark.gpu
def test_gpu_large_m_kernels_in_cuda_graphs():
    _require_sm90()
    qw, s, z, gi, g = make(2048, 4096, 128, True, False)
    w = w4a16_repack(qw, s, z, gi, 4, g, 4096)
    x = torch.randn(384, 4096, device="cuda", dtype=torch.bfloat16)
    for cfg in LARGE_M_CONFIGS[:1] + LARGE_M_CONFIGS[3:4] + LARGE_M_CONFIGS[-1:] + SPLIT_CONFIGS[:2]:
        w4a16_gemm(x, w, config=cfg)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = w4a16_gemm(x, w, config=cfg)
        for seed in range(2):
            x.copy_(torch.randn(384, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            ref = w4a16_gemm_ref(x, qw, s, z, gi, 4, g)
            assert (y.float() - ref.float()).abs().max().item() < 2e-2 * ref.float().abs().max().item()
        assert int(w.locks.abs().sum()) == 0  # split-K counters back at zero after each replay


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,g,sym,act,bias", [(300, 1000, 1152, 128, False, False, True),
                                                  (257, 1536, 2112, 0, True, False, False),
                                                  (129, 3000, 1000, 128, True, True, True)])
def test_gpu_wgmma_split_k_and_one_warpgroup_tiles(dtype, m, n, k, g, sym, act, bias):
    """Odd N, K not a multiple of 128, zeros + bias, per-channel, act-order; the split-K counters end at zero."""
    _require_sm90()
    qw, s, z, gi, g, w, x, b = _gpu_case(m, n, k, g, sym, act, bias, dtype)
    for cfg in SPLIT_CONFIGS + [SMALL_TILE]:
        for _ in range(2):
            check(x, qw, s, z, gi, 4, g, b, cfg, w=w)
        assert int(w.locks.abs().sum()) == 0


def _wg(bn, bm, stages, **kw):
    """An RS wgmma config: BLOCK_N / 16 warps."""
    return {"path": "wgmma", "BLOCK_N": bn, "BLOCK_M": bm, "num_warps": bn // 16, "num_stages": stages, "RS": True,
            **kw}


# whole tiles plus a split last wave; TAIL_SLOTS stands in for the SM count so small shapes split
TAIL_CONFIGS = [_wg(128, 64, 4, TAIL_SPLIT=True, TAIL_SLOTS=3), _wg(64, 64, 3, TAIL_SPLIT=True, TAIL_SLOTS=6),
                _wg(128, 256, 3, TAIL_SPLIT=True, TAIL_SLOTS=3)]


def test_tail_split_plan():
    """The last partial wave's tiles are split over K to fill it; full waves, SPLIT_K and tiny K are left alone."""
    from lowbit.kernels.w4a16_wgmma import tail_split

    big = {"BLOCK_N": 128, "BLOCK_M": 256, "TAIL_SPLIT": True, "TAIL_SLOTS": 132}
    assert tail_split(800, 40, big, "cpu") == (792, 10)  # 8 tiles left: 16 would fill the wave, K allows 10
    assert tail_split(800, 200, big, "cpu") == (792, 16)  # capped at TAIL_MAX = 16
    assert tail_split(792, 40, big, "cpu") == (792, 1)  # whole waves
    assert tail_split(100, 40, big, "cpu") == (100, 1)  # less than a wave: SPLIT_K's business
    assert tail_split(200, 40, big, "cpu") == (200, 1)  # 68 left: two pieces each would not fit one wave
    assert tail_split(170, 40, big, "cpu") == (132, 3)  # 38 left: 3 pieces each (114 CTAs) fill a third of a tile
    assert tail_split(800, 7, big, "cpu") == (800, 1)  # 7 K-blocks: under two splits of TAIL_MIN_KB
    assert tail_split(800, 40, dict(big, TAIL_SPLIT=False), "cpu") == (800, 1)
    assert tail_split(800, 40, dict(big, SPLIT_K=3), "cpu") == (0, 3)  # plain split-K: every tile


def _check_cut_tiles(x, qw, s, z, gi, g, b, cfg, w):
    """A config whose tiles are cut over K: equal to the reference, bit-equal launch after launch and in a CUDA-graph
    replay, the tile counters back at zero each time."""
    y0 = check(x, qw, s, z, gi, 4, g, b, cfg, w=w)
    for _ in range(3):
        assert torch.equal(w4a16_gemm(x, w, b, config=cfg), y0)
    assert int(w.locks.abs().sum()) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_gemm(x, w, b, config=cfg)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0) and int(w.locks.abs().sum()) == 0


# stream-K; TAIL_SLOTS stands in for the SM count so small shapes get tiles cut over K
SK_CONFIGS = [_wg(128, 128, 4, STREAM_K=True, TAIL_SLOTS=40), _wg(64, 64, 3, STREAM_K=True, TAIL_SLOTS=120),
              _wg(128, 64, 4, STREAM_K=True, TAIL_SLOTS=60)]


def test_stream_k_plan():
    """Every unit (tile, K-block) dealt out once, at most two tiles per CTA, pieces per tile within the workspace."""
    from lowbit.kernels.w4a16_wgmma import SK_MIN_KB, stream_k

    cfg = {"BLOCK_N": 128, "BLOCK_M": 128, "RS": True, "STREAM_K": True, "TAIL_SLOTS": 132}
    for tiles, kb in [(72, 28), (80, 64), (5, 9), (131, 4), (40, 3), (1, 100)]:
        plan = stream_k(tiles, kb, cfg, "cpu")
        if tiles * kb < 2 * SK_MIN_KB:
            assert plan is None
            continue
        per, ctas, p_max = plan
        assert per <= kb and (ctas - 1) * per < tiles * kb <= ctas * per and ctas <= 132
        for t in range(tiles):
            first, last = (t * kb) // per, ((t + 1) * kb - 1) // per
            assert last - first + 1 <= p_max
    assert stream_k(132, 28, cfg, "cpu") is None  # a full wave: tail_split's business
    assert stream_k(72, 28, dict(cfg, BLOCK_M=256), "cpu") is None  # two 256-wide pipelines: wgmmas serialized
    assert stream_k(72, 28, dict(cfg, STREAM_K=False), "cpu") is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,g,sym,act,bias", [(300, 1000, 1152, 128, False, False, True),
                                                  (129, 1536, 2112, 0, True, False, False),
                                                  (77, 640, 4096, 128, True, True, True)])
def test_gpu_wgmma_stream_k(dtype, m, n, k, g, sym, act, bias):
    """Tiles cut over K at arbitrary block boundaries (one or two tiles per CTA): equal to the reference, bit-equal
    launch after launch and in CUDA-graph replays, counters back at zero (odd N, K not a multiple of 128,
    per-channel, act-order, zeros + bias)."""
    _require_sm90()
    from lowbit.kernels.w4a16_wgmma import stream_k

    qw, s, z, gi, g, w, x, b = _gpu_case(m, n, k, g, sym, act, bias, dtype)
    for cfg in SK_CONFIGS:
        tiles = -(-n // cfg["BLOCK_N"]) * -(-m // cfg["BLOCK_M"])
        per, ctas, _ = stream_k(tiles, w.k_pad // w.block_k, cfg, "cuda")
        assert per < w.k_pad // w.block_k and ctas > tiles  # tiles cut over K
        _check_cut_tiles(x, qw, s, z, gi, g, b, cfg, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_wgmma_tail_split(dtype):
    """Whole tiles and K-split tail tiles in one launch: equal to the reference, deterministic, counters back at zero,
    and the same in CUDA-graph replays (odd N, K with a ragged last split, zeros + bias)."""
    _require_sm90()
    from lowbit.kernels.w4a16_wgmma import tail_split

    m, n, k = 300, 1000, 1152
    qw, s, z, gi, g = make(n, k, 128, False, False)
    w = w4a16_repack(qw, s, z, gi, 4, g, k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    for cfg in TAIL_CONFIGS:
        tiles = -(-n // cfg["BLOCK_N"]) * -(-m // cfg["BLOCK_M"])
        full, split = tail_split(tiles, w.k_pad // w.block_k, cfg, "cuda")
        assert 0 < full < tiles and split > 1, (cfg, tiles, full, split)
        _check_cut_tiles(x, qw, s, z, gi, g, b, cfg, w)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SPLIT_CONFIGS)
def test_gpu_wgmma_split_k_is_deterministic(cfg):
    """The fixed-order reduction gives bit-identical results launch after launch (whichever CTA arrives last)."""
    _require_sm90()
    qw, s, z, gi, g = make(3000, 4096, 128, False, False)
    w = w4a16_repack(qw, s, z, gi, 4, g, 4096)
    x = torch.randn(200, 4096, device="cuda", dtype=torch.bfloat16)
    y0 = check(x, qw, s, z, gi, 4, g, None, cfg, w=w)
    for _ in range(5):
        assert torch.equal(w4a16_gemm(x, w, config=cfg), y0)
    assert int(w.locks.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_dequant_overlap_in_cuda_graphs(dtype):
    """Dequant on a side stream overlapped with cuBLAS: equal to the one-chunk path, eagerly and in graph replays."""
    qw, s, z, gi, g = make(3000, 1000, 128, False, True)  # odd N, K not a multiple of 128, act-order, zeros
    w = w4a16_repack(qw, s, z, gi, 4, g, 1000)
    x = torch.randn(257, 1000, device="cuda", dtype=dtype)
    b = torch.randn(3000, device="cuda", dtype=dtype)
    cfg = {"path": "dequant", "chunks": 4, "overlap": True}
    check(x, qw, s, z, gi, 4, g, b, cfg, w=w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_gemm(x, w, b, config=cfg)
    for seed in range(2):
        x.copy_(torch.randn(257, 1000, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref = w4a16_gemm_ref(x, qw, s, z, gi, 4, g, b)
        assert (y.float() - ref.float()).abs().max().item() < 2e-2 * ref.float().abs().max().item()
