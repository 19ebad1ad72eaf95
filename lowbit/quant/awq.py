"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): scale salient input channels up before rounding, and search each group's clipping.

Scale search (paper section 3.2): for the linears that share an input X [T, K] (q/k/v, gate/up),
s = mean_t|X|^alpha over a grid of alpha in [0, 1), normalised by sqrt(max(s) * min(s)); the
quantized weight is Q(W diag(s)) diag(s)^-1 and the loss is the linears' output error
||W X^T - Q(W s)/s X^T||^2 = tr(D H D^T) with H = X^T X, so no activations are stored. alpha = 0
is s = 1 (plain RTN), so the search never does worse than RTN on the calibration set.
The chosen s is folded into the op that produces X (RMSNorm weight, or the rows of v_proj/up_proj),
so inference pays nothing; the stats of X are rescaled to the smoothed input X / s.

Clip search: per (row, group), the range max|w| * r for r in {1, 0.95, ..., 0.55} minimising that
group's output error w_g H_gg w_g^T (H's diagonal blocks). q/k_proj are not clipped (attention
logits are sensitive to their outliers; AutoAWQ skips them too).
"""

from __future__ import annotations

import math

import torch

from lowbit.quant.rtn import compute_qparams, dequantize_int, fake_quantize, quantize_int


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = w - wq
    return ((d @ h) * d).sum()


def search_scale(w: torch.Tensor, h: torch.Tensor, x_absmean: torch.Tensor, bits: int, group: int,
                 symmetric: bool, n_grid: int = 20, scale_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, float, float]:
    """w [N, K] (the sharing linears' rows concatenated), h [K, K], x_absmean [K] ->
    (s [K], loss at s, loss at s = 1)."""
    w = w.float()
    x_mean = x_absmean.float().clamp(min=1e-8)
    best_s, best, base = torch.ones_like(x_mean), None, None
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4, max=1e4)
        wq = fake_quantize(w * s, bits, group, symmetric, scale_dtype=scale_dtype) / s
        loss = float(output_error(w, wq, h))
        if i == 0:
            base = loss
        if best is None or loss < best:
            best, best_s = loss, s
    return best_s, best, base


def _diag_blocks(h: torch.Tensor, group: int) -> torch.Tensor:
    """[K, K] -> [ng, G, G] diagonal blocks (zero-padded at a partial last group)."""
    k = h.shape[0]
    ng = math.ceil(k / group)
    hp = torch.nn.functional.pad(h, (0, ng * group - k, 0, ng * group - k))
    idx = torch.arange(ng, device=h.device)
    return hp.view(ng, group, ng, group)[idx, :, idx, :]


def search_clip(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool, n_grid: int = 20,
                max_shrink: float = 0.5, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """w [N, K], h [K, K] -> clip ratio [N, ng] with the smallest per-group output error."""
    w = w.float()
    n, k = w.shape
    ng = math.ceil(k / group)
    hb = _diag_blocks(h.float(), group)  # [ng, G, G]
    best_err = torch.full((n, ng), float("inf"), device=w.device)
    best = torch.ones(n, ng, device=w.device)
    for i in range(int(max_shrink * n_grid)):
        ratio = 1 - i / n_grid
        clip = torch.full((n, ng), ratio, device=w.device)
        scales, zeros = compute_qparams(w, bits, group, symmetric, clip, scale_dtype)
        d = w - dequantize_int(quantize_int(w, scales, zeros, bits, group), scales, zeros, bits, group)
        d = torch.nn.functional.pad(d, (0, ng * group - k)).view(n, ng, group)
        err = torch.einsum("ngi,gij,ngj->ng", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor) -> None:
    """y = norm(x) * w  ->  y / s: the norm's weight absorbs 1/s."""
    norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)


def fold_into_rows(linear: torch.nn.Module, s: torch.Tensor) -> None:
    """The producing linear's output channels (rows) absorb 1/s."""
    linear.weight.data = (linear.weight.data.float() / s[:, None]).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.float() / s).to(linear.bias.dtype)


def scale_columns(linear: torch.nn.Module, s: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.data.float() * s[None, :]).to(linear.weight.dtype)
