"""Every scheme end to end on a tiny random Llama: quantize -> write -> read back in lowbit, and the
compressed-tensors output in transformers (CPU) with the same logits; the other formats give lowbit the
same logits as compressed-tensors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lowbit.eval.ppl import hf_logits_fn, lowbit_logits_fn
from lowbit.models.loader import load_model
from lowbit.quant import quantize
from lowbit.quant.recipes import SCHEMES

IDS = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0))


def _quantize(model_dir, out, scheme, calib, **kw):
    kw.setdefault("group_size", 32 if scheme.startswith("w4a16") else None)
    return quantize(model_dir, scheme, str(out), calib=calib, num_samples=4, seq_len=32, progress=False,
                    verbose=False, **kw)


def _lowbit_logits(path):
    model, _ = load_model(str(path), torch.device("cpu"), torch.float32, None)
    return lowbit_logits_fn(model, "cpu")(IDS)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_round_trip_matches_transformers(scheme, tiny_model_dir, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    report = _quantize(tiny_model_dir, tmp_path / "q", scheme, calib_file)
    assert report["summary"]["linears"] == 14 and report["ignored"] == ["lm_head"]
    assert report["size_after_bytes"] < report["size_before_bytes"]
    assert json.load(open(tmp_path / "q" / "quantization_report.json"))["scheme"] == scheme
    assert os.path.exists(tmp_path / "q" / "tokenizer.json")
    ours = _lowbit_logits(tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
    theirs = hf_logits_fn(hf)(IDS)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max()))
    base = hf_logits_fn(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))(IDS)
    assert not torch.allclose(ours, base)  # it really is quantized


@pytest.mark.parametrize("scheme,fmt,kw", [("w4a16-gptq", "gptq", {}), ("w8a16-gptq", "gptq", {}),
                                            ("w4a16-awq", "awq", {"symmetric": False}),
                                            ("fp8-block", "fp8-block", {}), ("w4a8-awq", "modelopt", {})])
def test_other_formats_read_back_like_compressed_tensors(scheme, fmt, kw, tiny_model_dir, calib_file, tmp_path):
    _quantize(tiny_model_dir, tmp_path / "ct", scheme, calib_file, **kw)
    _quantize(tiny_model_dir, tmp_path / fmt, scheme, calib_file, fmt=fmt, **kw)
    torch.testing.assert_close(_lowbit_logits(tmp_path / fmt), _lowbit_logits(tmp_path / "ct"), rtol=1e-4, atol=1e-4)


def test_fp8_block_partial_edge_blocks(tiny_tokenizer_dir, tmp_path):
    # SmolLM2-like K and N that 128 does not divide (96, 160): the edge blocks are partial
    from tests.helpers import make_hf_model

    from lowbit.quant.fp8 import fake_quantize_fp8, quantize_fp8_weight

    w = torch.randn(200, 576)
    q, s = quantize_fp8_weight(w, "block", (128, 128))
    assert s.shape == (2, 5) and q.shape == w.shape
    assert (fake_quantize_fp8(w, "block", (128, 128)) - w).abs().max() < 0.07 * w.abs().max()
    make_hf_model("llama", str(tmp_path / "m"), tokenizer_dir=tiny_tokenizer_dir, hidden_size=96, intermediate_size=160)
    for fmt in ("compressed-tensors", "fp8-block"):
        quantize(str(tmp_path / "m"), "fp8-block", str(tmp_path / fmt), fmt=fmt, progress=False, verbose=False)
    torch.testing.assert_close(_lowbit_logits(tmp_path / "fp8-block"), _lowbit_logits(tmp_path / "compressed-tensors"))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_awq_and_gptq_on_qwen_layers(arch, tiny_tokenizer_dir, calib_file, tmp_path):
    # Qwen2: q/k/v biases (AWQ divides them too when it folds); Qwen3: q/k norms inside attention
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_hf_model

    make_hf_model(arch, str(tmp_path / "m"), tokenizer_dir=tiny_tokenizer_dir, num_key_value_heads=4)
    for scheme in ("w4a16-awq", "w4a16-gptq"):
        report = _quantize(str(tmp_path / "m"), tmp_path / scheme, scheme, calib_file)
        assert report["summary"]["mean_error"] < report["summary"]["mean_rtn_error"]
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / scheme), dtype=torch.float32)
        theirs = hf_logits_fn(hf)(IDS)
        torch.testing.assert_close(_lowbit_logits(tmp_path / scheme), theirs, rtol=1e-3,
                                   atol=1e-3 * float(theirs.abs().max()))
