"""Every entry of the checked-in w4a16 table of the GPU this runs on computes the right result on its own shape.

The tables (lowbit/kernels/configs/w4a16_<gpu>.json) are written by bench/kernels/w4a16.py from timings alone; this
runs each (shape, M bucket) config once at M = the bucket on random int4 g128 symmetric weights (what the tables were
tuned on) against the fp32 reference, so a config that is fast but wrong on its real shape cannot hide.
"""

from __future__ import annotations

import os

import pytest
import torch

from lowbit.kernels import w4a16_tune as tune
from lowbit.kernels.w4a16_layout import w4a16_repack
from tests.kernels.test_w4a16 import check, make

CUDA = torch.cuda.is_available()


def _table() -> dict:
    if not CUDA:
        return {}
    return tune._read(os.path.join(tune.CONFIG_DIR, f"w4a16_{tune.gpu_key('cuda')}.json"))  # {} when absent


TABLE = _table()


@pytest.mark.gpu
@pytest.mark.skipif(not TABLE, reason="no checked-in w4a16 table for this GPU (or no GPU)")
@pytest.mark.parametrize("shape", sorted(TABLE) or ["none"])
def test_gpu_table_entry_is_correct_on_its_shape(shape):
    n, k = (int(v) for v in shape.split(":")[0].split("x"))
    qw, s, z, gi, g = make(n, k, 128, True, False, seed=n + k, device="cuda")
    w = w4a16_repack(qw, s, z, gi, 4, g, k)
    for bucket, cfg in sorted(TABLE[shape].items(), key=lambda kv: int(kv[0])):
        cfg = {key: v for key, v in cfg.items() if key != "us"}
        x = torch.randn(int(bucket), k, device="cuda", dtype=torch.bfloat16)
        try:
            check(x, qw, s, z, gi, 4, g, config=cfg, w=w)
        except AssertionError as exc:
            raise AssertionError(f"{shape} M={bucket} {cfg}: {exc}") from exc
        torch.cuda.empty_cache()
