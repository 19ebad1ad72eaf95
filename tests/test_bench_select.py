"""The w4a8 selection pass (bench/kernels/w4a8.py choose, fp8_tune.longest_run): sweep rows -> per-M picks -> M ranges."""

from __future__ import annotations

import os

import pytest
import torch

from bench.kernels.fp8_tune import longest_run
from bench.kernels.w4a8 import choose, select_ranges


def _row(m, cand="dequant_cublas", us=100.0, **cols):
    base = {"N": 256, "K": 512, "M": m, "cand": cand, "us": us, "cand_static": "dequant_cublas_x128",
            "static_us": 100.0}
    return {**base, **cols}


def test_choose_switches_only_on_a_clear_win():
    rows = [_row(32, "fused", 10.0, w16_us=9.0, pre_us=12.0, fused_us=10.0, dequant_cublas_us=20.0),
            _row(64, "fused", 10.0, w16_us=9.9, pre_us=9.0, fused_us=10.0, dequant_cublas_us=20.0),
            _row(256, us=100.0, w16_us=60.0, dequant_cublas_us=100.0, dequant_us=120.0,
                 w16_static_us=99.0, dequant_cublas_x128_static_us=100.0)]
    ch = choose(rows)
    # w16 10% faster at 32, fused_pre 10% faster at 64 (w16 1% faster: not a clear win), w16 at 256
    assert ch[(256, 512, "token_group", "w16")] == [(32, "w16"), (64, "fused_pre"), (256, "w16")]
    # without w16: fused_pre must beat the next best non-w16 candidate by 3%
    assert ch[(256, 512, "token_group", "fused_pre")] == [(32, "fused"), (64, "fused_pre"), (256, "dequant_cublas")]
    # static: w16 1% faster than the current x128 pick at 256 -> the current pick stays
    assert ch[(256, 512, "tensor_static", "w16")][-1] == (256, "dequant_cublas_x128")


def test_choose_keeps_fused_within_its_m_range():
    """In-kernel fused timed fastest above fused_max_m is no pick (pick_candidate cannot return it there); at or
    below it, it takes the M back from w16."""
    rows = [_row(16, "w16", 12.0, w16_us=12.0, pre_us=15.0, fused_us=9.0, fused_static_us=9.0, w16_static_us=12.0),
            _row(64, "w16", 12.0, w16_us=12.0, pre_us=15.0, fused_us=9.0, fused_static_us=9.0, w16_static_us=12.0)]
    rows[0]["cand_static"] = rows[1]["cand_static"] = "w16"
    rows[0]["static_us"] = rows[1]["static_us"] = 12.0
    for act in ("token_group", "tensor_static"):
        assert choose(rows, fused_max_m=32)[(256, 512, act, "w16")] == [(16, "fused"), (64, "w16")]
        assert choose(rows)[(256, 512, act, "w16")] == [(16, "fused"), (64, "fused")]  # no bound given


def test_select_ranges_close_the_gap_after_fused():
    """fused (in-kernel) picked at 32 = fused_max_m and w16 from 64: w16 starts at 33, not leaving 33..63 to
    dequant_cublas; a fused pick below fused_max_m with the run right after it changes nothing."""
    old = {"w16": {}, "fused_pre": {}, "w16_default": None, "fused_max_m": 32}
    choice = {(256, 512, "tensor_static", "w16"): [(16, "fused"), (32, "fused"), (64, "w16"), (128, "w16")],
              (256, 512, "token_group", "w16"): [(16, "fused"), (32, "w16"), (64, "w16")]}
    r = select_ranges(choice, old)
    assert r[("w16", "256x512", "tensor_static")] == [33, 128]
    assert r[("w16", "256x512", "token_group")] == [32, 64]


def test_run_is_the_longest_consecutive_run():
    picks = [(32, "w16"), (64, "w16"), (128, "x"), (256, "w16"), (512, "w16"), (1024, "w16")]
    assert longest_run(picks, "w16") == [256, 1024]
    assert longest_run(picks, "x") == [128, 128]
    assert longest_run(picks, "fused_pre") is None
    assert longest_run([(1, "a"), (2, "b"), (3, "a")], "a") == [3, 3]  # ties: the larger M


def test_select_ranges_keep_a_measured_lower_bound():
    """A run starting at 32 keeps a configured lower bound of 17 when 16 was measured before it (nothing measured in
    between), not one of 8 (16 was measured and lost); fused_pre stays at or below 64; w16 without a run is None."""
    old = {"w16": {"256x512": {"token_group": [17, 64], "tensor_static": [8, 64]}}, "w16_default": [32, 128],
           "fused_pre": {}}
    picks = [(16, "fused"), (32, "w16"), (64, "w16"), (128, "dequant_cublas")]
    ch = {(256, 512, "token_group", "w16"): picks, (256, 512, "tensor_static", "w16"): picks,
          (256, 512, "token_group", "fused_pre"): [(64, "x"), (128, "fused_pre")],
          (512, 512, "token_group", "w16"): [(32, "fused"), (64, "dequant_cublas")]}
    r = select_ranges(ch, old)
    assert r[("w16", "256x512", "token_group")] == [17, 64]
    assert r[("w16", "256x512", "tensor_static")] == [32, 64]
    assert r[("fused_pre", "256x512", "token_group")] is None
    assert r[("w16", "512x512", "token_group")] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_layers_bench_runs(tmp_path):
    """python -m bench.kernels.w4a8 decode on one small shape: every (op, M) row times all three kinds and the
    results section is written."""
    from bench.kernels.w4a8 import DECODE_OPS, decode_layers

    rows = decode_layers(str(tmp_path), ms=(1, 4), shapes=[(256, 512)])
    assert [(r["M"], r["op"]) for r in rows] == [(m, op) for m in (1, 4) for op in DECODE_OPS]
    for r in rows:
        assert all(r[k] and r[k] > 0 for k in ("w4a16_us", "static_us", "us")), r
    assert any(f.endswith(".json") for f in os.listdir(tmp_path))
