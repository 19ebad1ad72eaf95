"""ModelOpt unified checkpoints (FP8, W4A8_AWQ) and DeepSeek W4AFP8 MIXED_PRECISION (lowbit/formats/modelopt.py,
writer in modelopt_w4a8.py).

ModelOpt and TRT-LLM cannot be installed here: every checkpoint is written by tests/formats/fp8_fixtures.py, an
independent quantizer/packer following formats.md §5.3/§6 (int4 two rows per uint8 for ModelOpt, two K elements
per int8 for W4AFP8), from tiny random HF models whose K are multiples of 128 as ModelOpt's blocks require.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lowbit.config import load_config
from lowbit.formats.base import FormatError, QuantizedModule, detect_format, read_canonical
from lowbit.formats.modelopt import ModelOptFormat
from lowbit.formats.modelopt_w4a8 import save_checkpoint
from lowbit.kernels.reference import dequantize_int
from lowbit.scheme import FP8_BLOCK, FP8_TENSOR_STATIC, W4A8_TENSOR_STATIC, W4A16_G128
from tests.formats import fp8_fixtures as fx
from tests.helpers import make_hf_model

DIMS = dict(hidden_size=256, intermediate_size=384)
P = "model.layers.0.mlp.down_proj"
SMOOTHED = dataclasses.replace(W4A8_TENSOR_STATIC, input_smoothing=True)


@pytest.fixture(scope="module")
def w4a8_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("w4a8"))
    hf = make_hf_model("qwen2", d, seed=11, **DIMS)  # qwen2: q/k/v carry a bias
    written = fx.write_modelopt_w4a8(hf, d, fx.PROMPT)
    return d, hf, written


@pytest.mark.filterwarnings("ignore:ModelOpt FP8. fp8 KV-cache scales")  # asserted once below; loading warns again
def test_modelopt_fp8_end_to_end(tmp_path):
    """Independent ModelOpt-FP8-layout writer (formats.md §5.3): static per-tensor weight and input scales, KV
    k_scale/v_scale dropped with one warning; logits == transformers with dequantized weights, static fp8 inputs."""
    hf = make_hf_model("llama", str(tmp_path), seed=10, **DIMS)
    fx.write_modelopt_fp8(hf, str(tmp_path), fx.PROMPT)
    with pytest.warns(UserWarning, match="KV-cache scales"):
        fmt = detect_format(str(tmp_path), load_config(str(tmp_path)))
    assert isinstance(fmt, ModelOptFormat) and fmt.scheme_for("model.layers.1.mlp.up_proj") == FP8_TENSOR_STATIC
    assert fmt.scheme_for("lm_head") is None
    fx.assert_logits_match(str(tmp_path), hf)


def test_modelopt_w4a8_awq_end_to_end(w4a8_ckpt):
    """Independent ModelOpt-W4A8_AWQ-layout writer (formats.md §6.1): uint8 [N/2, K] row pairs, [N, K/128] scales,
    pre_quant_scale on o_proj/down_proj only; logits == transformers with dequantized weights and x * s -> fp8."""
    d, hf, _ = w4a8_ckpt
    fmt = detect_format(d, load_config(d))
    assert fmt.scheme_for("model.layers.0.self_attn.q_proj") == W4A8_TENSOR_STATIC
    assert fmt.scheme_for("model.layers.0.self_attn.o_proj") == SMOOTHED
    assert fmt.scheme_for("model.layers.0.mlp.down_proj").input_smoothing
    fx.assert_logits_match(d, hf)


def test_w4afp8_mixed_precision_dense_end_to_end(tmp_path):
    """Independent TRT-LLM-W4AFP8-layout writer (formats.md §6.2) on a dense stand-in: block fp8 attention, int4
    along K (int8 [N, K/2]) + weight_scale_inv MLP, quant_cfg.json with fused names (qkv_proj, gate_up_proj)."""
    hf = make_hf_model("llama", str(tmp_path), seed=12, **DIMS)
    fx.write_w4afp8_dense(hf, str(tmp_path), fx.PROMPT)
    fmt = detect_format(str(tmp_path), load_config(str(tmp_path)))
    assert fmt.scheme_for("model.layers.0.self_attn.v_proj") == FP8_BLOCK
    assert fmt.scheme_for("model.layers.1.mlp.gate_proj") == W4A8_TENSOR_STATIC
    fx.assert_logits_match(str(tmp_path), hf)


def _w4afp8_experts(tmp_path, quant_cfg=None):
    """A DeepSeek-R1-W4AFP8-like header: routed experts int4 + experts.E.w1/w2/w3.input_scale, MLA projection in
    block fp8, router and norms 16-bit (tensor level: lowbit has no MoE model yet)."""
    gen = torch.Generator().manual_seed(3)
    tensors, expect = {}, {}
    for e in range(2):
        for proj, (n, k), w in (("gate_proj", (256, 128), 1), ("down_proj", (128, 256), 2), ("up_proj", (256, 128), 3)):
            prefix = f"model.layers.3.mlp.experts.{e}.{proj}"
            packed, q, s = fx.w4afp8_expert_tensors(prefix, torch.randn(n, k, generator=gen))
            a = torch.tensor([0.01 * (e + 1) * w])
            tensors.update({**packed, f"model.layers.3.mlp.experts.{e}.w{w}.input_scale": a})
            expect[prefix] = (fx.dequant_int4(q, s), a)
    q, s = fx.quant_fp8_block(torch.randn(576, 256, generator=gen))
    tensors.update({"model.layers.3.self_attn.kv_a_proj_with_mqa.weight": q,
                    "model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale_inv": s,
                    "model.layers.3.mlp.gate.weight": torch.randn(2, 256, generator=gen).bfloat16(),
                    "model.layers.3.mlp.gate.e_score_correction_bias": torch.zeros(2),
                    "model.layers.3.input_layernorm.weight": torch.ones(256).bfloat16()})
    extra = {"hf_quant_config.json": {"quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None}}}
    if quant_cfg:
        extra["quant_cfg.json"] = quant_cfg
    d = fx.synthetic_dir(tmp_path, tensors, None, extra, architectures=["DeepseekV3ForCausalLM"],
                         model_type="deepseek_v3", hidden_size=256)
    return d, expect


@pytest.mark.parametrize("with_map", [False, True])
def test_w4afp8_expert_names(tmp_path, with_map):
    """Independent W4AFP8 packer at the tensor level: without quant_cfg.json the documented convention applies
    (routed experts int4, the rest block fp8); with it, `mlp.experts` and `self_attn.fused_a` entries resolve.
    experts.E.w1/w2/w3.input_scale become gate/down/up_proj.input_scale; canonical tensors dequantize exactly."""
    quant_cfg = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        "model.layers.3.self_attn.fused_a": {"quant_algo": "FP8_BLOCK_SCALES"},
        "model.layers.3.mlp.experts": {"quant_algo": "W4A8_AWQ"}}} if with_map else None
    d, expect = _w4afp8_experts(tmp_path, quant_cfg)
    fmt = detect_format(d, load_config(d))
    assert fmt.info["per_layer_map"] == with_map
    assert fmt.scheme_for("model.layers.3.mlp.experts.1.down_proj") == W4A8_TENSOR_STATIC
    assert fmt.scheme_for("model.layers.3.self_attn.kv_a_proj_with_mqa") == FP8_BLOCK
    assert fmt.scheme_for("model.layers.3.mlp.gate") is None
    modules, plain = read_canonical(d, fmt)
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in plain and not any(".w1." in n for n in plain)
    for prefix, (w, a) in expect.items():
        t = modules[prefix].tensors
        assert sorted(t) == ["input_scale", "qweight", "scales"]
        assert torch.equal(t["input_scale"], a.reshape(())), prefix
        deq = dequantize_int(t["qweight"], t["scales"], None, None, 4, 128, w.shape[1])
        assert torch.equal(deq, w), prefix


def test_w4a8_writer_round_trip(w4a8_ckpt, tmp_path):
    """lowbit's ModelOpt W4A8_AWQ writer on the canonical tensors of the fixture checkpoint: its weight,
    weight_scale, input_scale and pre_quant_scale equal the independent fixture's bytes, the canonical tensors
    read back bit-identical (sharded + index), weight_scale_2 is the documented amax/448, and it loads."""
    d, hf, written = w4a8_ckpt
    canon = read_canonical(d, ModelOptFormat.from_checkpoint(d, load_config(d)))
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")  # the writer takes the unquantized model's config
    out = str(tmp_path / "out")
    save_checkpoint(out, config, *canon, ignore=["lm_head"], max_shard_size=200_000)
    with open(os.path.join(out, "hf_quant_config.json")) as f:
        hfq = json.load(f)["quantization"]
    assert hfq["quant_algo"] == "W4A8_AWQ" and hfq["group_size"] == 128 and hfq["exclude_modules"] == ["lm_head"]
    assert hfq["pre_quant_scale"] is True  # the fixture keeps pre_quant_scale on o_proj/down_proj
    assert load_config(out).quantization["quant_method"] == "modelopt"
    fx.assert_same_canonical(canon, read_canonical(out, ModelOptFormat.from_checkpoint(out, load_config(out))))
    disk = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            disk.update(load_file(os.path.join(out, f)))
    for name, t in written.items():
        if not name.endswith("weight_scale_2"):
            assert t.dtype == disk[name].dtype and torch.equal(fx.bits(t), fx.bits(disk[name])), name
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]  # ModelOpt shares weight_scale_2 across them
    deq = [dequantize_int(canon[0][m].tensors["qweight"], canon[0][m].tensors["scales"], None, None, 4, 128,
                          DIMS["hidden_size"]) for m in qkv]
    want = (max(x.abs().max() for x in deq) / 448).reshape(())
    assert all(torch.equal(disk[f"{m}.weight_scale_2"], want) for m in qkv)
    fx.assert_logits_match(out, hf)


def _w4a8_module(n, k, scheme=W4A8_TENSOR_STATIC):
    return QuantizedModule(scheme, {"qweight": torch.zeros(n, k // 8, dtype=torch.int32),
                                    "scales": torch.ones(n, k // 128), "input_scale": torch.tensor(0.1)})


def test_config_json_only_modelopt(tmp_path):
    """Newer exports may carry quant_algo in config.json's quantization_config alone (quant_method modelopt)."""
    q, s = fx.quant_fp8_tensor(torch.randn(64, 192))
    d = fx.synthetic_dir(tmp_path, {f"{P}.weight": q, f"{P}.weight_scale": s, f"{P}.input_scale": torch.tensor(0.1),
                                    "lm_head.weight": torch.randn(32, 192)},
                         {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"]})
    fmt = detect_format(d, load_config(d))
    assert isinstance(fmt, ModelOptFormat) and fmt.scheme_for(P) == FP8_TENSOR_STATIC and not fmt.scheme_for("lm_head")


def test_w4a8_writer_without_smoothing_says_so(tmp_path):
    """Folded AWQ smoothing (no pre_quant_scale tensor anywhere): hf_quant_config must not promise one."""
    save_checkpoint(str(tmp_path), {}, {"model.layers.0.mlp.up_proj": _w4a8_module(64, 128)}, {})
    with open(os.path.join(tmp_path, "hf_quant_config.json")) as f:
        assert json.load(f)["quantization"]["pre_quant_scale"] is False


def test_w4a8_writer_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"down_proj.qweight has N = 63 output rows \(odd\)"):
        save_checkpoint(str(tmp_path), {}, {"model.layers.0.mlp.down_proj": _w4a8_module(63, 128)}, {})
    with pytest.raises(ValueError, match=r"up_proj has scheme w4a16 .*supported: int4 group 128 symmetric"):
        save_checkpoint(str(tmp_path), {}, {"model.layers.0.mlp.up_proj": _w4a8_module(64, 128, W4A16_G128)}, {})


# ---- malformed checkpoints: each error names the tensor or value ------------------------------------

def _modelopt_dir(tmp_path, tensors, algo="W4A8_AWQ", **quant):
    hfq = {"producer": {"name": "modelopt", "version": "0.37.0"},
           "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 128, **quant}}
    return fx.synthetic_dir(tmp_path, tensors, None, {"hf_quant_config.json": hfq})


def _w4a8_tensors(n=64, k=256):
    q, s = fx.quant_int4_groups(torch.randn(n, k))
    return {f"{P}.weight": fx.pack_rows_uint8(q), f"{P}.weight_scale": s, f"{P}.weight_scale_2": torch.tensor(0.01),
            f"{P}.input_scale": torch.tensor(0.02)}


def _fails(tmp_path, tensors, exc, match, **kw):
    d = _modelopt_dir(tmp_path, tensors, **kw)
    with pytest.raises(exc, match=match):
        read_canonical(d, detect_format(d, load_config(d)))


def test_unknown_quant_algo(tmp_path):
    _fails(tmp_path, _w4a8_tensors(), NotImplementedError, r"quant_algo 'NVFP4' is not supported; supported: \('FP8'",
           algo="NVFP4")


def test_unknown_per_layer_algo(tmp_path):
    _fails(tmp_path, _w4a8_tensors(), NotImplementedError, f"{P}: quantized_layers quant_algo 'W4A16_AWQ' is not",
           algo="MIXED_PRECISION", quantized_layers={P: {"quant_algo": "W4A16_AWQ"}})


def test_odd_n_row_pairs(tmp_path):
    t = _w4a8_tensors(n=64)
    t[f"{P}.weight_scale"] = t[f"{P}.weight_scale"][:63]
    _fails(tmp_path, t, FormatError, rf"{P}.weight_scale: N = 63 output rows is odd")


def test_wrong_group_scale_shape(tmp_path):
    t = _w4a8_tensors()
    t[f"{P}.weight_scale"] = t[f"{P}.weight_scale"][:, :1]
    _fails(tmp_path, t, FormatError, rf"{P}.weight_scale: shape \(64, 1\), expected \(64, 2\)")


def test_missing_w4a8_input_scale(tmp_path):
    t = _w4a8_tensors()
    t.pop(f"{P}.input_scale")
    _fails(tmp_path, t, FormatError, f"{P}.input_scale is missing: W4A8 activations are static")


def test_bad_weight_scale_2(tmp_path):
    _fails(tmp_path, {**_w4a8_tensors(), f"{P}.weight_scale_2": torch.tensor(-1.0)}, FormatError,
           f"{P}.weight_scale_2: scale -1.0 is not a finite positive number")


def test_fp8_weight_under_w4a8(tmp_path):
    _fails(tmp_path, {f"{P}.weight": torch.zeros(64, 256, dtype=torch.float8_e4m3fn),
                      f"{P}.weight_scale": torch.tensor(1.0)}, FormatError, f"{P}.weight: F8_E4M3, but W4A8_AWQ stores")


def test_excluded_module_stored_quantized(tmp_path):
    _fails(tmp_path, _w4a8_tensors(), FormatError, f"{P}.weight is stored quantized .* excluded",
           exclude_modules=["model.layers.0.mlp*"])


def test_w4afp8_block_fp8_missing_weight_scale_inv(tmp_path):
    name = "model.layers.3.self_attn.o_proj"
    _fails(tmp_path, {f"{name}.weight": torch.zeros(256, 128, dtype=torch.float8_e4m3fn)}, FormatError,
           f"{name}.weight_scale_inv is missing", algo="MIXED_PRECISION")
