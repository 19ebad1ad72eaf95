"""The triton_fp8 and triton_w4a8 backends: registration, declining what they cannot run, and tiny fp8 / W4A8
checkpoints (tests/formats/fp8_fixtures.py writers) whose logits on CUDA match the reference backend."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.layers.linear import Linear
from lowbit.layers.quant_methods import Fp8Method
from lowbit.layers.selection import LayerShape, backends_for
from lowbit.scheme import FP8_BLOCK, FP8_CHANNEL_TOKEN, FP8_TENSOR_STATIC, W4A8_TENSOR_STATIC, QuantScheme
from tests.formats import fp8_fixtures as fx
from tests.helpers import Stepper, make_hf_model

# on the CPU the kernels' own device check passes under TRITON_INTERPRET (selection still refuses: sm89+)
CUDA = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = LayerShape(256, 512, (256,))


def test_registered_before_reference():
    for family, name in (("w8a8_fp8", "triton_fp8"), ("w8a8_fp8_block", "triton_fp8"), ("w4a8", "triton_w4a8")):
        names = [b.name for b in backends_for(family)]
        assert name in names and names.index(name) < names.index("reference"), names
        b = next(b for b in backends_for(family) if b.name == name)
        assert b.min_capability == (8, 9) and b.tests.startswith("tests/kernels/")
    assert "triton_fp8" not in [b.name for b in backends_for("w8a16_fp8")]


def test_can_implement_reasons():
    fp8 = next(b for b in backends_for("w8a8_fp8_block") if b.name == "triton_fp8")
    assert fp8.can_implement(FP8_BLOCK, SHAPE, CUDA, torch.bfloat16) == (True, "")
    ok, why = fp8.can_implement(dataclasses.replace(FP8_BLOCK, block_size=(128, 64), act_group_size=64), SHAPE, CUDA,
                                torch.bfloat16)
    assert not ok and "64" in why
    ok, why = fp8.can_implement(FP8_TENSOR_STATIC, SHAPE, CUDA, torch.int8)
    assert not ok and "dtype" in why
    w4a8 = next(b for b in backends_for("w4a8") if b.name == "triton_w4a8")
    ok, why = w4a8.can_implement(dataclasses.replace(W4A8_TENSOR_STATIC, group_size=64), SHAPE, CUDA, torch.float16)
    assert not ok and "group size 64" in why
    ok, why = w4a8.can_implement(dataclasses.replace(W4A8_TENSOR_STATIC, symmetric=False), SHAPE, CUDA, torch.float16)
    assert not ok and "asymmetric" in why


def test_cpu_layer_falls_back_to_reference():
    layer = Linear(256, [128, 64], quant_method=Fp8Method(FP8_CHANNEL_TOKEN), dtype=torch.bfloat16, prefix="l")
    layer.weight.data.copy_(torch.randn(192, 256).to(torch.float8_e4m3fn))
    layer.weight_scale.data.fill_(0.01)
    layer.process_after_loading()
    assert layer.backend.name == "reference"


DIMS = dict(hidden_size=192, intermediate_size=320)  # partial 128-blocks along N and K


def _write(kind: str, d: str):
    if kind == "block":
        hf = make_hf_model("qwen3", d, seed=3, **DIMS)
        fx.write_block_fp8(hf, d)
    elif kind in ("autofp8_static", "autofp8_dynamic"):
        hf = make_hf_model("llama", d, seed=5, **DIMS)
        fx.write_autofp8(hf, d, fx.PROMPT, static=kind == "autofp8_static")
    else:
        hf = make_hf_model("llama", d, seed=6, **DIMS)
        fx.write_modelopt_w4a8(hf, d, fx.PROMPT)
    return hf


KINDS = [("block", "triton_fp8"), ("autofp8_static", "triton_fp8"), ("autofp8_dynamic", "triton_fp8"),
         ("modelopt_w4a8", "triton_w4a8")]


def _logits(model_dir: str, backend: str, device: str, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setenv("LOWBIT_BACKEND", backend)
    st = Stepper(model_dir, device=device, dtype=torch.float32)
    names = {m.backend.name for m in st.model.modules() if hasattr(m, "backend")}
    assert names == {backend}, names
    seq = st.add(fx.PROMPT)
    return [st.step({seq.seq_id: t})[seq.seq_id].float().cpu() for t in fx.CONT]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; on CUDA see the gpu test below")
@pytest.mark.parametrize("kind,backend", KINDS)
def test_tiny_model_wiring_matches_reference_in_interpreter(tmp_path, monkeypatch, kind, backend):
    """The backends' repack + apply through the Triton interpreter (exact fp32 products and sums): logits equal the
    reference backend's to float32 summation order (observed ~4e-6)."""
    _write(kind, str(tmp_path))
    for b in backends_for("w8a8_fp8") + backends_for("w4a8"):
        if b.name == backend:
            monkeypatch.setattr(b, "min_capability", None)  # let the selection take it on the CPU
    fused_calls = []
    for b in {id(b): b for b in backends_for("w8a8_fp8") + backends_for("w8a8_fp8_block") + backends_for("w4a8")
              }.values():
        if b.name == backend:  # the MLP hands gate|up to down_proj: SiLU-mul fused into quantization
            original = b.apply_silu_mul
            monkeypatch.setattr(b, "apply_silu_mul", lambda *a, f=original: fused_calls.append(1) or f(*a))
    monkeypatch.setattr("lowbit.layers.backends.fp8_triton.FUSE_SILU_MIN_M", 1)  # fused even for tiny M
    got = _logits(str(tmp_path), backend, "cpu", monkeypatch)
    want = _logits(str(tmp_path), "reference", "cpu", monkeypatch)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())
    assert fused_calls


@pytest.mark.gpu
@pytest.mark.parametrize("kind,backend", KINDS)
def test_tiny_model_selects_backend_and_matches_reference(tmp_path, kind, backend):
    """On CUDA the selection picks the backend by itself, and every quantized layer of the loaded model matches the
    reference backend on the same input. Compared per layer, not on logits: Hopper fp8 MMAs accumulate each
    128-long K-block with ~14-bit precision (DeepSeek-V3 report 3.3.2), and on these random 2-layer models output
    perturbations of 1e-5 already flip fp8 activation codes downstream and move logits by 2-7% (measured on the
    CPU with the reference backend), so a logits budget could not tell a bug from that."""
    from lowbit.layers.backends.reference import REFERENCE

    _write(kind, str(tmp_path))
    st = Stepper(str(tmp_path), device="cuda", dtype=torch.float32)
    layers = [m for m in st.model.modules() if hasattr(m, "backend")]
    assert {m.backend.name for m in layers} == {backend}
    seq = st.add(fx.PROMPT)
    assert all(torch.isfinite(st.step({seq.seq_id: t})[seq.seq_id]).all() for t in fx.CONT)
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in layers:
        for m in (1, 13):  # decode (split-K kernel) and a prefill-sized batch
            x = torch.randn(m, layer.in_features, device="cuda", generator=g)
            y = layer(x)
            REFERENCE.prepare(layer)
            y_ref = REFERENCE.apply(layer, x, layer.bias)
            err = ((y - y_ref).norm() / y_ref.norm()).item()
            assert err < 1e-2, f"{layer.prefix} M={m}: relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("kind,backend", KINDS)
def test_fused_silu_mul_matches_unfused_mlp(tmp_path, kind, backend, monkeypatch):
    """down_proj(silu(gate) * up) through the fused SiLU-mul + quantize kernel equals the unfused path (the fused
    SiLU's exp may differ from torch's in the last fp32 bit, which can move an fp8 code by one step); modelopt_w4a8's
    down_proj carries a pre_quant_scale, fused into the same pass."""
    _write(kind, str(tmp_path))
    st = Stepper(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    mlp = st.model.model.layers[0].mlp
    assert mlp.down_proj.backend.name == backend
    assert (getattr(mlp.down_proj, "pre_quant_scale", None) is not None) == (backend == "triton_w4a8")
    g = torch.Generator(device="cuda").manual_seed(0)
    monkeypatch.setattr("lowbit.layers.backends.fp8_triton.FUSE_SILU_MIN_M", 1)  # the fused kernel at every M
    for m in (1, 13, 300):
        h = torch.randn(m, mlp.down_proj.in_features * 2, device="cuda", generator=g).to(torch.bfloat16)
        fused = mlp.down_proj.backend.apply_silu_mul(mlp.down_proj, h, mlp.down_proj.bias)
        plain = mlp.down_proj(mlp.act(h))
        err = ((fused.float() - plain.float()).norm() / plain.float().norm()).item()
        assert fused.shape == plain.shape and err < 1e-2, f"{kind} M={m}: relative error {err:.3g}"
        if backend == "triton_w4a8" and m <= 16:  # decode: SiLU-mul writes x fake-quantized for the w4a16 GEMM
            from lowbit.kernels.w4a8 import w4a8_linear

            d, scheme = mlp.down_proj, mlp.down_proj.quant_method.scheme
            want = w4a8_linear(h, d.w4a8_weights, scheme.act_granularity, d.w4a8_input_scale, bias=d.bias,
                               ue8m0=scheme.ue8m0_scales, pre_quant_scale=d.pre_quant_scale, silu_mul=True,
                               candidate="w16")
            assert torch.equal(fused, want), f"{kind} M={m}: {(fused - want).abs().max()}"


def _norm_linear_cases(backend):
    """(label, patches, expected) per path apply_rms_norm can take: patches force the GEMM candidate the backend
    sees; expected, the candidate the layer's own path must take to give the same output (for w4a8's decode picks,
    fused and fused_pre, 16-bit x goes to w16: the norm writes the fake-quantized operand, kernels/w4a8.py
    producer_candidate)."""
    if backend == "triton_fp8":
        return [("quantize first", {"lowbit.kernels.fp8_gemm.fuses_quant": lambda *a: False}, None)]
    return [(c, {"lowbit.kernels.w4a8.pick_candidate": lambda *a, c=c, **k: c},
             {"lowbit.kernels.w4a8.pick_candidate": lambda *a, c=e, **k: c})
            for c, e in (("fused", "w16"), ("fused_pre", "w16"), ("w16", "w16"), ("dequant", "dequant"))]


def _check_fused_norm(tmp_path, kind, backend, device, dtype, ms, monkeypatch):
    """backend.apply_rms_norm(layer, x, residual, norm) against the norm kernel's output fed to the layer: the same
    e4m3 codes (or fake-quantized values) reach the same GEMM, so the outputs are equal bit for bit, and the new
    residual is x + residual. Both projections that follow a norm (qkv_proj, gate_up_proj) are checked."""
    from lowbit.kernels.norm import rms_norm
    from lowbit.layers.norm import norm_linear

    _write(kind, str(tmp_path))
    st = Stepper(str(tmp_path), device=device, dtype=dtype)
    dec = st.model.model.layers[0]
    g = torch.Generator(device=device).manual_seed(0)
    for norm, linear in ((dec.input_layernorm, dec.self_attn.qkv_proj), (dec.post_attention_layernorm,
                                                                          dec.mlp.gate_up_proj)):
        assert linear.backend.name == backend
        for label, patches, expected in _norm_linear_cases(backend):
            for m in ms:
                if label.startswith("fused") and m > 64:  # (decode-size kernels: pick_candidate keeps them to M <= 64)
                    continue
                x = torch.randn(m, linear.in_features, device=device, generator=g).to(dtype)
                r = torch.randn(m, linear.in_features, device=device, generator=g).to(dtype)
                for res in (None, r):
                    for target, fn in patches.items():
                        monkeypatch.setattr(target, fn)
                    out = linear.backend.apply_rms_norm(linear, x, res, norm)
                    for target, fn in (expected or {}).items():
                        monkeypatch.setattr(target, fn)
                    h = rms_norm(x, norm.weight, norm.eps, residual=res)
                    want = linear(h if res is None else h[0])
                    if linear.quant_method.scheme.act_granularity == "tensor_dynamic":  # its amax spans the tensor
                        assert out is None
                        out = norm_linear(norm, linear, x, res)  # the norm module, then the layer
                        want = linear(norm(x) if res is None else norm(x, res)[0])
                    assert out is not None, f"{kind} {label} M={m}: not fused"
                    y, new_res = out
                    assert torch.equal(y, want), f"{kind} {label} M={m}: {(y - want).abs().max()}"
                    assert new_res is x if res is None else torch.equal(new_res, x + r)
            monkeypatch.undo()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; on CUDA see the gpu test below")
@pytest.mark.parametrize("kind,backend", KINDS)
def test_fused_rms_norm_matches_unfused_in_interpreter(tmp_path, monkeypatch, kind, backend):
    for b in backends_for("w8a8_fp8") + backends_for("w4a8"):
        if b.name == backend:
            monkeypatch.setattr(b, "min_capability", None)  # let the selection take it on the CPU
    monkeypatch.setenv("LOWBIT_BACKEND", backend)
    _check_fused_norm(tmp_path, kind, backend, "cpu", torch.float16, (3,), monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,backend", KINDS)
def test_fused_rms_norm_matches_unfused(tmp_path, kind, backend, monkeypatch):
    _check_fused_norm(tmp_path, kind, backend, "cuda", torch.bfloat16, (1, 40, 300), monkeypatch)


def test_scheme_presets_are_served():
    assert QuantScheme("fp8_e4m3", "channel", act_dtype="fp8_e4m3", act_granularity="token").name == "w8a8_fp8"
    assert W4A8_TENSOR_STATIC.name == "w4a8" and FP8_BLOCK.name == "w8a8_fp8_block"
