"""GPTQ on single layers: error below RTN, damping retry, act-order, groups, asymmetric, exact dequant."""

from __future__ import annotations

import pytest
import torch

from lowbit.quant.gptq import gptq_quantize, inverse_hessian_factor, relative_error
from lowbit.quant.rtn import dequantize_int, fake_quantize


def _layer(n=48, k=96, t=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few loud channels, like a transformer's: GPTQ has something to exploit
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    x[:, :4] *= 8
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x.t() @ x


@pytest.mark.parametrize("group,act_order,sym", [(32, "static", True), (32, "off", True), (96, "dynamic", False),
                                                 (40, "static", False), (96, "off", True)])
def test_gptq_error_below_rtn(group, act_order, sym):
    w, h = _layer()
    res = gptq_quantize(w, h, 4, group, sym, act_order)
    rtn = fake_quantize(w, 4, group, sym)
    e_gptq, e_rtn = relative_error(w, res.dequant, h), relative_error(w, rtn, h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    q = res.quant
    assert q.q.min() >= 0 and q.q.max() <= 15 and q.scales.shape == (48, -(-96 // group))
    assert (q.zeros is None) == sym
    assert (q.g_idx is not None) == (act_order == "dynamic" and group < 96)
    # what the checkpoint stores dequantizes to exactly what GPTQ measured
    assert torch.equal(dequantize_int(q.q, q.scales, q.zeros, 4, group, q.g_idx), res.dequant)


def test_int8_channelwise_and_scale_dtype():
    w, h = _layer()
    res = gptq_quantize(w, h, 8, 96, True, "static", scale_dtype=torch.bfloat16)
    assert res.quant.q.max() <= 255
    assert torch.equal(res.quant.scales, res.quant.scales.to(torch.bfloat16).float())  # storable exactly
    assert relative_error(w, res.dequant, h) < 1e-3


def test_damping_retries_on_a_non_positive_definite_hessian():
    h = torch.diag(torch.tensor([1.0, 1.0, -0.05, 1.0]))
    _, damp = inverse_hessian_factor(h, 0.01)  # 0.01 * mean diag is not enough to lift -0.05
    assert damp == pytest.approx(0.1)
    w = torch.randn(8, 4)
    assert gptq_quantize(w, h, 4, 4, True, "off").damp == pytest.approx(0.1)
    x = torch.randn(2, 6)
    _, damp = inverse_hessian_factor(x.t() @ x, 0.0)  # rank 2 of 6: singular without damping
    assert damp >= 1e-3  # zero damping still grows
    with pytest.raises(RuntimeError, match="singular"):
        inverse_hessian_factor(-torch.eye(3) * 5, 0.01)


def test_dead_columns_and_bad_act_order():
    w, h = _layer()
    h[5, :] = 0
    h[:, 5] = 0  # no token ever touched input 5
    res = gptq_quantize(w, h, 4, 32, True, "static")
    assert torch.isfinite(res.dequant).all()
    with pytest.raises(ValueError, match="act-order"):
        gptq_quantize(w, h, 4, 32, True, "sometimes")


def test_too_few_tokens_fall_back_to_rtn_and_are_reported():
    from lowbit.quant.capture import InputStats
    from lowbit.quant.layerwise import quantize_group
    from lowbit.quant.recipes import make_recipe

    lin = torch.nn.Linear(64, 16, bias=False)
    w0 = lin.weight.data.clone()
    stats = InputStats()
    stats.update(torch.randn(4, 64))  # a rarely routed expert: 4 tokens
    mods, reps = quantize_group(make_recipe("w4a16-gptq", 32), ["experts.3.down_proj"], [lin], stats, torch.float32)
    assert reps[0].note.startswith("RTN fallback: 4 calibration tokens")
    torch.testing.assert_close(lin.weight.data, fake_quantize(w0, 4, 32, True))
    assert set(mods["experts.3.down_proj"].tensors) == {"qweight", "scales"}
