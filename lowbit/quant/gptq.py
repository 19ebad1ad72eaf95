"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize W [N, K] column by column, spreading each column's rounding error over the
not-yet-quantized columns through the inverse Hessian of the layer's reconstruction loss
||W X - Q X||^2, H = X^T X [K, K] summed over calibration tokens.

  - damping: H += damp * mean(diag H) * I; a Hessian that is still not positive definite is retried
    with 10x the damping (up to 1.0) before giving up.
  - lazy batch updates: columns run in blocks of B; inside a block the update touches the block only,
    the rest of W receives the block's errors in one matmul (the paper's section 4, step 2).
  - Cholesky form: rows of the upper Cholesky factor of H^-1 give the error propagation (step 3).
  - act-order: columns in order of decreasing diag(H). "static": every group's scale/zero comes from
    the original weights before the loop, so groups stay contiguous in the original column order and
    the checkpoint needs no g_idx; "dynamic": groups follow the processing order (g_idx [K] written).
  - groups of G columns (channel-wise: G = K); the last group is partial when G does not divide K.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from lowbit.quant.rtn import IntQuant, compute_qparams, dequantize_int

ACT_ORDERS = ("off", "static", "dynamic")


@dataclass
class GPTQResult:
    quant: IntQuant  # in the original column order
    dequant: torch.Tensor  # [N, K] float32, what the checkpoint dequantizes to
    damp: float  # the damping that made H positive definite


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, retrying with more damping."""
    mean_diag = torch.diag(h).abs().mean().clamp(min=1e-12)  # > 0 even for a broken H
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    while True:
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, damp
        if damp >= 1.0:
            raise RuntimeError(f"GPTQ: the Hessian stays singular even with damping {damp}; too little calibration data?")
        damp = min(1.0, max(damp * 10, 1e-3))  # 0 would never grow


@contextlib.contextmanager
def single_cpu_thread(device: torch.device):
    """The column loop is thousands of tiny ops: on a CPU, OpenMP's per-op fork/join costs more than it
    saves, and on a shared machine it stalls badly (measured 0.4 s with 1 thread vs 6-26 s with 2 under
    load for a 576x1536 weight). GPUs are unaffected."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool,
                  act_order: str = "static", damp: float = 0.01, block_size: int = 128,
                  scale_dtype: torch.dtype | None = None) -> GPTQResult:
    """w [N, K], h [K, K] (X^T X) -> GPTQResult. group = K for channel-wise."""
    if act_order not in ACT_ORDERS:
        raise ValueError(f"act-order {act_order!r} is not supported; supported: {ACT_ORDERS}")
    with single_cpu_thread(w.device):
        return _gptq(w, h, bits, group, symmetric, act_order, damp, block_size, scale_dtype)


def _gptq(w, h, bits, group, symmetric, act_order, damp, block_size, scale_dtype) -> GPTQResult:
    n, k = w.shape
    group = min(group, k)
    maxq = 2**bits - 1
    W = w.float().clone()
    H = h.float().clone()
    dead = torch.diag(H) == 0  # columns no calibration token ever touched: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(torch.diag(H), descending=True) if act_order != "off" else None
    precomputed = act_order == "static" or group == k  # qparams fixed up front, in original order
    if precomputed:
        scales, zeros = compute_qparams(W, bits, group, symmetric, scale_dtype=scale_dtype)
    else:
        ng = math.ceil(k / group)
        scales = torch.ones(n, ng, device=W.device)
        zeros = None if symmetric else torch.zeros(n, ng, dtype=torch.int32, device=W.device)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_hessian_factor(H, damp)
    if precomputed:  # per-column scale [N, K] (and zero) in processing order: no host sync inside the loop
        col_group = (perm if perm is not None else torch.arange(k, device=W.device)) // group
        col_s = scales[:, col_group]
        col_z = zeros[:, col_group].float() if zeros is not None else None

    if group < k:  # groups start at block starts (in processing order)
        block_size = max(group, (block_size // group) * group)
    Q = torch.zeros_like(W)
    Qint = torch.zeros_like(W)
    s = z = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if precomputed:
                s = col_s[:, col]
                z = col_z[:, col] if col_z is not None else 2 ** (bits - 1)
            elif col % group == 0:  # a new group: its params from the error-updated columns
                cols = torch.cat([W1[:, i:], W[:, i2:col + group]], dim=1)[:, :group]
                gs, gz = compute_qparams(cols, bits, cols.shape[1], symmetric, scale_dtype=scale_dtype)
                scales[:, col // group] = gs[:, 0]
                s = gs[:, 0]
                if gz is not None:
                    zeros[:, col // group] = gz[:, 0]
                z = gz[:, 0].float() if gz is not None else 2 ** (bits - 1)
            x = W1[:, i]
            q = (torch.round(x / s) + z).clamp(0, maxq)
            dq = (q - z) * s
            Qint[:, col] = q
            Q[:, col] = dq
            err = (x - dq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q, Qint = Q[:, inv], Qint[:, inv]
        if not precomputed:
            g_idx = (inv // group).to(torch.int32)  # column k was processed at position inv[k]
    quant = IntQuant(Qint.to(torch.int32), scales, zeros, g_idx)
    # the dequantized weight the checkpoint will give back (equal to Q up to float rounding)
    dq = dequantize_int(quant.q, scales, zeros, bits, group, g_idx)
    return GPTQResult(quant, dq, damp)


def relative_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """||W X - Q X||^2 / ||W X||^2 on the calibration inputs, from H = X^T X: tr(D H D^T) / tr(W H W^T)."""
    w, d = w.float(), w.float() - wq.float()
    den = ((w @ h) * w).sum()
    return float(((d @ h) * d).sum() / den.clamp(min=1e-30))
