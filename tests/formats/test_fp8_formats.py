"""Native fp8 checkpoints (lowbit/formats/fp8.py): DeepSeek/Qwen3 block fp8 and AutoFP8 per-tensor fp8.

The real producers cannot be installed here: every checkpoint is written by tests/formats/fp8_fixtures.py, an
independent quantizer/packer following formats.md §4/§5, from tiny random HF models with hidden 192 and
intermediate 320 so that the 128-block scale grids have partial edge blocks (k_proj N = 32 or 96, K = 192).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lowbit.config import load_config
from lowbit.formats.base import FormatError, QuantizedModule, detect_format, read_canonical
from lowbit.formats.fp8 import Fp8Format, save_checkpoint
from lowbit.models.loader import load_model
from lowbit.scheme import FP8_BLOCK, FP8_TENSOR_STATIC, QuantScheme
from tests.formats import fp8_fixtures as fx
from tests.helpers import make_hf_model

DIMS = dict(hidden_size=192, intermediate_size=320)
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def block_ckpt(tmp_path_factory):
    """Qwen3 in the Qwen3-*-FP8 layout (modules_to_not_convert lists lm_head and the norms)."""
    d = str(tmp_path_factory.mktemp("block_fp8"))
    hf = make_hf_model("qwen3", d, seed=3, **DIMS)
    fx.write_block_fp8(hf, d)
    return d, hf


def test_block_fp8_qwen3_end_to_end(block_ckpt):
    """Independent fixture quantizer (formats.md §4) -> lowbit logits == transformers with dequantized weights and
    per-token-group(128) fp8 activations (quantize_fp8_ref in pre-hooks)."""
    d, hf = block_ckpt
    fmt = detect_format(d, load_config(d))
    assert isinstance(fmt, Fp8Format)
    assert fmt.scheme_for("model.layers.0.self_attn.k_proj") == FP8_BLOCK
    assert fmt.scheme_for("lm_head") is None and fmt.scheme_for("model.layers.0.input_layernorm") is None
    fx.assert_logits_match(d, hf)


@pytest.mark.parametrize("arch,block,ue8m0", [("llama", (128, 128), True), ("qwen2", (64, 32), False)])
def test_block_fp8_ue8m0_and_other_block_sizes_end_to_end(tmp_path, arch, block, ue8m0):
    """Independent fixture quantizer (formats.md §4): scale_fmt ue8m0 gives power-of-two activation scales (the
    reference side rounds them up too); any BN x BK block is accepted because the reference path handles it."""
    hf = make_hf_model(arch, str(tmp_path), seed=4, **DIMS)
    fx.write_block_fp8(hf, str(tmp_path), block=block, ue8m0=ue8m0)
    scheme = detect_format(str(tmp_path), load_config(str(tmp_path))).scheme_for("model.layers.1.mlp.down_proj")
    assert scheme.block_size == block and scheme.act_group_size == block[1] and scheme.ue8m0_scales == ue8m0
    fx.assert_logits_match(str(tmp_path), hf)


@pytest.mark.filterwarnings("ignore:fp8. fp8 KV-cache scales")  # asserted once below; loading warns again
@pytest.mark.parametrize("arch,static,legacy", [("llama", True, False), ("qwen2", False, False), ("qwen3", True, True)])
def test_autofp8_end_to_end(tmp_path, arch, static, legacy):
    """Independent AutoFP8-layout writer (formats.md §5.1): 0-dim weight_scale, 0-dim input_scale (static; old
    exports `act_scale`), fp8 KV output_scales that lowbit drops with one warning."""
    hf = make_hf_model(arch, str(tmp_path), seed=5, **DIMS)
    fx.write_autofp8(hf, str(tmp_path), fx.PROMPT, static=static, legacy=legacy, kv_scales=static)
    if static:
        with pytest.warns(UserWarning, match="KV-cache scales"):
            fmt = detect_format(str(tmp_path), load_config(str(tmp_path)))
    else:
        fmt = detect_format(str(tmp_path), load_config(str(tmp_path)))
    want = FP8_TENSOR_STATIC if static else QuantScheme("fp8_e4m3", "tensor", act_dtype="fp8_e4m3",
                                                        act_granularity="tensor_dynamic")
    assert fmt.scheme_for("model.layers.0.self_attn.q_proj") == want and fmt.scheme_for("lm_head") is None
    modules, _ = read_canonical(str(tmp_path), fmt)
    k = modules["model.layers.0.self_attn.k_proj"].tensors
    assert k["weight_scale"].shape == () and ("input_scale" in k) == static and "output_scale" not in k
    fx.assert_logits_match(str(tmp_path), hf)


def test_block_fp8_writer_round_trip(block_ckpt, tmp_path):
    """lowbit's block-fp8 writer on the canonical tensors of the fixture checkpoint: sharded output + index, read
    back bit-identical, on-disk tensors equal to the independent fixture's, and the written model loads."""
    d, hf = block_ckpt
    fmt = Fp8Format.from_checkpoint(d, load_config(d))
    canon = read_canonical(d, fmt)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    out = str(tmp_path / "out")
    save_checkpoint(out, config, *canon, ignore=["lm_head"], max_shard_size=100_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    qcfg = load_config(out).quantization
    assert qcfg == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    fx.assert_same_canonical(canon, read_canonical(out, Fp8Format.from_checkpoint(out, load_config(out))))
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = load_file(os.path.join(d, "model.safetensors"))
    for name in ("model.layers.1.mlp.gate_proj.weight_scale_inv", "model.layers.0.self_attn.k_proj.weight"):
        shard = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"][name]
        with safe_open(os.path.join(out, shard), "pt") as f:
            assert torch.equal(fx.bits(f.get_tensor(name)), fx.bits(src[name])), name
    fx.assert_logits_match(out, hf)


def test_block_fp8_writer_refuses_other_schemes(tmp_path):
    w = torch.zeros(8, 8, dtype=E4M3)
    mods = {"model.layers.0.mlp.down_proj": QuantizedModule(FP8_TENSOR_STATIC, {"weight": w,
                                                                                 "weight_scale": torch.tensor(1.0)})}
    with pytest.raises(ValueError, match=r"w8a8_fp8 \(weights fp8_e4m3 per-tensor.*not supported; supported: fp8 block"):
        save_checkpoint(str(tmp_path), {}, mods, {})
    mods = {"model.layers.0.mlp.down_proj": QuantizedModule(FP8_BLOCK, {"weight": w, "weight_scale": torch.ones(2, 1)})}
    with pytest.raises(ValueError, match=r"down_proj.weight_scale_inv: shape \(2, 1\), expected \(1, 1\)"):
        save_checkpoint(str(tmp_path), {}, mods, {})


def test_ue8m0_from_top_level_config_and_router_names(tmp_path):
    """DeepSeek-V3.1 inference configs carry scale_fmt at the top of config.json; a Qwen router entry
    (`mlp.gate`) in modules_to_not_convert must not exclude `mlp.gate_proj`."""
    q, s = fx.quant_fp8_block(torch.randn(64, 192))
    d = fx.synthetic_dir(tmp_path, {"model.layers.0.mlp.gate_proj.weight": q,
                                    "model.layers.0.mlp.gate_proj.weight_scale_inv": s,
                                    "model.layers.0.mlp.gate.weight": torch.randn(4, 192)},
                         {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                          "modules_to_not_convert": ["model.layers.0.mlp.gate"]}, scale_fmt="ue8m0")
    fmt = Fp8Format.from_checkpoint(d, load_config(d))
    assert fmt.scheme_for("model.layers.0.mlp.gate_proj").ue8m0_scales
    assert fmt.scheme_for("model.layers.0.mlp.gate") is None


# ---- malformed checkpoints: each error names the tensor ----------------------------------------------

BLOCK = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"}
STATIC = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
DOWN = "model.layers.0.mlp.down_proj"
W = torch.randn(192, 320).to(E4M3)  # down_proj [N, K]: grid (2, 3) by ceil, (1, 2) by floor


def _open(tmp_path, tensors, qcfg, **config):
    d = fx.synthetic_dir(tmp_path, tensors, qcfg, **config)
    return Fp8Format.from_checkpoint(d, load_config(d))


def test_missing_weight_scale_inv(tmp_path):
    with pytest.raises(FormatError, match=f"{DOWN}.weight_scale_inv is missing"):
        _open(tmp_path, {f"{DOWN}.weight": W}, BLOCK)


def test_floor_scale_grid_is_rejected(tmp_path):
    with pytest.raises(FormatError, match=rf"{DOWN}.weight_scale_inv: shape \(1, 2\), expected \(2, 3\)"):
        _open(tmp_path, {f"{DOWN}.weight": W, f"{DOWN}.weight_scale_inv": torch.ones(1, 2)}, BLOCK)


def test_missing_per_tensor_weight_scale(tmp_path):
    with pytest.raises(FormatError, match=f"{DOWN}.weight_scale is missing"):
        _open(tmp_path, {f"{DOWN}.weight": W, f"{DOWN}.input_scale": torch.tensor(0.1)}, STATIC)


def test_missing_static_input_scale(tmp_path):
    with pytest.raises(FormatError, match=f"{DOWN}.input_scale is missing: static"):
        _open(tmp_path, {f"{DOWN}.weight": W, f"{DOWN}.weight_scale": torch.tensor(0.1)}, STATIC)


def test_per_channel_weight_scale_is_rejected(tmp_path):
    with pytest.raises(FormatError, match=rf"{DOWN}.weight_scale: F32 \(192,\); expected one float"):
        _open(tmp_path, {f"{DOWN}.weight": W, f"{DOWN}.weight_scale": torch.ones(192),
                         f"{DOWN}.input_scale": torch.tensor(0.1)}, STATIC)


def test_zero_scale_is_rejected_before_the_kernel(tmp_path):
    d = fx.synthetic_dir(tmp_path, {f"{DOWN}.weight": W, f"{DOWN}.weight_scale": torch.tensor(0.0),
                                    f"{DOWN}.input_scale": torch.tensor(0.1)}, STATIC)
    with pytest.raises(FormatError, match=f"{DOWN}.weight_scale: scale 0.0 is not a finite positive number"):
        read_canonical(d, Fp8Format.from_checkpoint(d, load_config(d)))


def test_fp8_weight_in_modules_to_not_convert(tmp_path):
    with pytest.raises(FormatError, match="lm_head.weight is stored as fp8 but lm_head is listed"):
        _open(tmp_path, {"lm_head.weight": W, "lm_head.weight_scale_inv": torch.ones(2, 3)},
              {**BLOCK, "modules_to_not_convert": ["lm_head"]})


def test_scale_beside_a_16bit_weight(tmp_path):
    with pytest.raises(FormatError, match=f"{DOWN}.weight_scale_inv: a weight scale beside a F32 weight"):
        _open(tmp_path, {f"{DOWN}.weight": W.float(), f"{DOWN}.weight_scale_inv": torch.ones(2, 3)}, BLOCK)


def test_unsupported_settings(tmp_path):
    tensors = {f"{DOWN}.weight": W, f"{DOWN}.weight_scale_inv": torch.ones(2, 3)}
    with pytest.raises(NotImplementedError, match="activation_scheme 'static' is not supported; supported: dynamic"):
        _open(tmp_path / "a", tensors, {**BLOCK, "activation_scheme": "static"})
    with pytest.raises(NotImplementedError, match="fmt 'e5m2' is not supported; supported: e4m3"):
        _open(tmp_path / "b", tensors, {**BLOCK, "fmt": "e5m2"})
    with pytest.raises(ValueError, match=r"weight_block_size \[128\]: expected two positive ints"):
        _open(tmp_path / "c", tensors, {**BLOCK, "weight_block_size": [128]})
    with pytest.raises(NotImplementedError, match="no weight is stored as float8_e4m3fn"):
        _open(tmp_path / "d", {f"{DOWN}.weight": W.float()}, BLOCK)


def test_loader_reports_the_bad_tensor(tmp_path):
    """A malformed tiny model fails in load_model (format detection), naming the tensor, before any layer runs."""
    hf = make_hf_model("llama", str(tmp_path), seed=6, **DIMS)
    fx.write_block_fp8(hf, str(tmp_path))
    fx.rewrite(str(tmp_path), {"model.layers.1.self_attn.v_proj.weight_scale_inv": None})
    with pytest.raises(FormatError, match="model.layers.1.self_attn.v_proj.weight_scale_inv is missing"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)
