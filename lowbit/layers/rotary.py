"""Rotary position embeddings: default, linear, dynamic NTK, llama3 and YaRN frequency schedules.

For a rotary dim d and position p: angle_i = p * inv_freq_i, i < d/2.
  neox style (Llama/Qwen): x = [x1 | x2] halves;   out = [x1 cos - x2 sin | x2 cos + x1 sin]
  interleaved (GPT-J, DeepSeek MLA): pairs (x_2i, x_2i+1) rotate together.
cos/sin are multiplied by `attention_scaling` (YaRN's mscale; 1 otherwise), computed in float32 and
applied in the activation dtype, as transformers does. Formulas follow the papers and the
transformers reference implementation (modeling_rope_utils.py), which the tests compare against.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] (float32) and the cos/sin scaling for this schedule.

    `seq_len` matters only for "dynamic" (NTK scaling grows with the current sequence length).
    """
    dim = cfg.rotary_dim
    if cfg.type == "default":
        return _base_inv_freq(cfg.theta, dim), 1.0
    if cfg.type == "linear":
        return _base_inv_freq(cfg.theta, dim) / cfg.factor, 1.0
    if cfg.type == "dynamic":
        max_pos = cfg.max_position_embeddings
        # float32 arithmetic, as transformers does it at run time (its seq_len is a tensor)
        n = torch.tensor(max(seq_len or max_pos, max_pos), dtype=torch.int64)
        base = cfg.theta * ((cfg.factor * n / max_pos) - (cfg.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if cfg.type == "llama3":
        inv = _base_inv_freq(cfg.theta, dim)
        old_ctx = cfg.original_max_position_embeddings
        low_wavelen = old_ctx / cfg.low_freq_factor
        high_wavelen = old_ctx / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        smooth = (old_ctx / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if cfg.type == "yarn":
        return _yarn_inv_freq(cfg)
    raise ValueError(f"unknown rope type {cfg.type!r}")


def _yarn_inv_freq(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    dim, base, factor = cfg.rotary_dim, cfg.theta, cfg.factor
    if cfg.attention_factor is not None:
        scaling = float(cfg.attention_factor)
    elif cfg.mscale and cfg.mscale_all_dim:
        scaling = _yarn_mscale(factor, cfg.mscale) / _yarn_mscale(factor, cfg.mscale_all_dim)
    else:
        scaling = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    # x [T, H, d], cos/sin [T, 1, d/2]
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, neox_style: bool = True):
    """Rotate the first d dims of q [T, Hq, D] and k [T, Hk, D]; cos_sin [T, d] float32 is cos|sin."""
    d = cos_sin.shape[-1]
    cos, sin = cos_sin.to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    if d == q.shape[-1]:
        return _rotate(q, cos, sin, neox_style), _rotate(k, cos, sin, neox_style)
    q = torch.cat((_rotate(q[..., :d], cos, sin, neox_style), q[..., d:]), dim=-1)
    k = torch.cat((_rotate(k[..., :d], cos, sin, neox_style), k[..., d:]), dim=-1)
    return q, k


class RotaryEmbedding(nn.Module):
    """Looks up cos|sin [T, d] for `positions` [T]; one instance is shared by all layers."""

    def __init__(self, cfg: RopeConfig, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.rotary_dim = cfg.rotary_dim or head_dim
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def materialize(self, device: torch.device) -> None:
        """Build the [max_position_embeddings, d] float32 table (called once after loading)."""
        self.cos_sin = _table(*rope_inv_freq(self.cfg), self.cfg.max_position_embeddings).to(device)

    def forward(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.type == "dynamic":
            return self._dynamic(positions, seq_lens)
        return self.cos_sin[positions]  # the engine keeps positions < max_position_embeddings

    def _dynamic(self, positions: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        # dynamic NTK: each sequence uses the frequencies for its own current length
        if seq_lens is None:
            seq_lens = torch.full_like(positions, int(positions.max()) + 1)
        out = torch.empty(positions.shape[0], self.rotary_dim, dtype=torch.float32, device=positions.device)
        for n in torch.unique(seq_lens).tolist():
            sel = seq_lens == n
            inv_freq, scaling = rope_inv_freq(self.cfg, int(n))
            angles = positions[sel].float()[:, None] * inv_freq.to(positions.device)[None, :]
            out[sel] = torch.cat((angles.cos() * scaling, angles.sin() * scaling), dim=-1)
        return out


def _table(inv_freq: torch.Tensor, scaling: float, n: int) -> torch.Tensor:
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos() * scaling, angles.sin() * scaling), dim=-1)
