"""Rotary frequency schedules against transformers' implementations, and the rotation itself."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import parse_config
from lowbit.layers.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq
from tests.helpers import hf_config

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
}


def _lowbit_cfg(hf):
    raw = hf.to_dict()
    raw["architectures"] = ["LlamaForCausalLM"]
    return parse_config(raw)


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("seq_len", [None, 600])
def test_inv_freq_matches_transformers(name, seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_config("llama", max_position_embeddings=256, rope_parameters=dict(ROPES[name]))
    ours, our_scale = rope_inv_freq(_lowbit_cfg(hf).rope, seq_len)
    rtype = ROPES[name]["rope_type"]
    if rtype == "default":
        want = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
        want_scale = 1.0
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[rtype](hf, "cpu", seq_len=seq_len)
    torch.testing.assert_close(ours, want.float(), rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(want_scale)


def test_rotation_matches_rotate_half_formula():
    torch.manual_seed(0)
    hf = hf_config("llama", max_position_embeddings=64, rope_parameters=dict(ROPES["yarn"]))
    cfg = _lowbit_cfg(hf).rope
    rot = RotaryEmbedding(cfg, 16)
    rot.materialize(torch.device("cpu"))
    pos = torch.tensor([0, 3, 17, 63])
    q, k = torch.randn(4, 3, 16), torch.randn(4, 1, 16)
    inv, scale = rope_inv_freq(cfg)
    ang = pos[:, None].float() * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None] * scale
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None] * scale

    def rotate_half(x):
        return torch.cat([-x[..., 8:], x[..., :8]], -1)

    got_q, got_k = apply_rotary(q, k, rot(pos))
    torch.testing.assert_close(got_q, q * cos + rotate_half(q) * sin)
    torch.testing.assert_close(got_k, k * cos + rotate_half(k) * sin)


def test_partial_rotary_and_interleaved():
    q, k = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    cos_sin = torch.cat([torch.zeros(2, 2), torch.ones(2, 2)], -1)  # angle pi/2 on a 4-dim rotary slice
    nq, nk = apply_rotary(q, k, cos_sin)
    assert torch.equal(nq[..., 4:], q[..., 4:]) and torch.equal(nk[..., 4:], k[..., 4:])  # untouched tail
    torch.testing.assert_close(nq[..., :2], -q[..., 2:4])
    iq, _ = apply_rotary(q, k, cos_sin, neox_style=False)
    torch.testing.assert_close(iq[..., 0:4:2], -q[..., 1:4:2])  # pairs (0,1), (2,3) rotate together
