"""GPTQ reader and writer against checkpoints built independently from the documented layout.

AutoGPTQ/GPTQModel cannot be installed here (CUDA builds), so the fixtures in gptq_fixtures.py re-create their
tensors from formats.md §1 with a numpy packer of their own (not lowbit's): qweight [K/P, N] packed along K,
qzeros [K/G, N/P] packed along N (v1: zero - 1), scales [K/G, N] fp16, g_idx [K].
"""

from __future__ import annotations

import os
import re
import zlib

import pytest
import torch

from lowbit.config import load_config
from lowbit.formats.base import FormatError, QuantizedModule, detect_format, read_canonical
from lowbit.formats.gptq import GPTQFormat, save_checkpoint
from lowbit.formats.int_packing import pack_cols, unpack_cols
from lowbit.scheme import QuantScheme
from tests.formats.gptq_fixtures import (TINY_CONFIG, act_order_g_idx, compare_with_hf, dequant, gptq_tensors,
                                         pack_last, quantize_hf_model, rtn, unpack_last, write_dir)
from tests.helpers import make_hf_model

P = "model.layers.0.self_attn.q_proj"


def qcfg(bits=4, group_size=128, sym=True, desc_act=False, fmt="gptq", **extra):
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": fmt, **extra}


def one_module(tmp_path, n=64, k=256, bits=4, group=128, sym=True, fmt="gptq", g_idx=None, cfg=None, seed=0,
               legacy=None):
    """A checkpoint dir holding one GPTQ module P; returns (dir, q, scales, zeros, g_idx)."""
    torch.manual_seed(seed)
    q, scales, zeros, g_idx = rtn(torch.randn(n, k), bits, group, sym, g_idx, min_zero=1 if fmt == "gptq" else 0)
    tensors = {f"{P}.{leaf}": t for leaf, t in gptq_tensors(q, scales, zeros, g_idx, bits, fmt).items()}
    write_dir(str(tmp_path), tensors, None if legacy else cfg or qcfg(bits, group, sym, fmt=fmt), TINY_CONFIG, legacy)
    return str(tmp_path), q, scales, zeros, g_idx


def load(model_dir):
    return GPTQFormat.from_checkpoint(model_dir, load_config(model_dir))


# ---- layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, order", [(4, None), (8, None), (4, [0, 2, 4, 6, 1, 3, 5, 7])])  # GPTQ, GPTQ, AWQ
def test_pack_unpack_match_the_documented_layout(bits, order):
    q = torch.randint(0, 2**bits, (5, 64))
    order_t = tuple(order) if order else None
    packed = pack_cols(q, bits, order_t)
    assert torch.equal(packed, pack_last(q.numpy(), bits, order))
    assert torch.equal(unpack_cols(packed, bits, 64, order_t), q.int())
    assert (unpack_last(packed.numpy(), bits, order) == q.numpy()).all()


def test_symmetric_zero_words_are_the_documented_constants():
    z4, z8 = torch.full((1, 8), 8), torch.full((1, 4), 128)
    assert pack_last(z4 - 1, 4).item() == 0x77777777  # v1 4-bit sym
    assert pack_last(z4, 4).item() == -2004318072  # v2 0x88888888
    assert pack_last(z8 - 1, 8).item() == 0x7F7F7F7F
    assert pack_last(z8, 8).view(torch.int32).item() == -2139062144  # 0x80808080


# ---- reader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [-1, 32, 64, 128])
def test_reader_gives_canonical_tensors(tmp_path, fmt, bits, sym, group):
    d, q, scales, zeros, g_idx = one_module(tmp_path, bits=bits, group=group, sym=sym, fmt=fmt)
    fmt_ = load(d)
    scheme = fmt_.scheme_for(P)
    assert scheme == QuantScheme(f"int{bits}", "channel" if group == -1 else "group",
                                 group_size=None if group == -1 else group, symmetric=sym)
    assert fmt_.scheme_for("model.embed_tokens") is None and fmt_.scheme_for("model.layers.0.self_attn.k_proj") is None
    mods, plain = read_canonical(d, fmt_)
    t = mods[P].tensors
    assert set(t) == ({"qweight", "scales"} | (set() if sym else {"zeros"}))
    assert torch.equal(t["qweight"], pack_last(q.numpy(), bits))  # [N, K/P] along K
    assert t["scales"].dtype == torch.float32 and torch.equal(t["scales"], scales)
    if not sym:
        assert torch.equal(t["zeros"], zeros.int())
    from lowbit.kernels.reference import dequantize_int

    w = dequantize_int(t["qweight"], t["scales"], t.get("zeros"), None, bits, scheme.effective_group(256), 256)
    assert torch.equal(w, dequant(q, scales, zeros, g_idx))


def test_act_order_g_idx_is_kept_and_dequantizes(tmp_path):
    g_idx = act_order_g_idx(256, 32, seed=3)
    d, q, scales, zeros, g_idx = one_module(tmp_path, group=32, sym=False, fmt="gptq_v2", g_idx=g_idx,
                                            cfg=qcfg(4, 32, False, desc_act=True, fmt="gptq_v2"))
    fmt_ = load(d)
    assert fmt_.scheme_for(P).act_order
    t = read_canonical(d, fmt_)[0][P].tensors
    assert torch.equal(t["g_idx"], g_idx) and t["g_idx"].dtype == torch.int32
    from lowbit.kernels.reference import dequantize_int

    w = dequantize_int(t["qweight"], t["scales"], t["zeros"], t["g_idx"], 4, 32, 256)
    assert torch.equal(w, dequant(q, scales, zeros, g_idx))


@pytest.mark.parametrize("desc_act", [True, False])
def test_trivial_g_idx_is_not_act_order(tmp_path, desc_act):
    # static_groups / GAR / no desc_act all save g_idx = k // G; only the tensor tells
    d, *_ = one_module(tmp_path, group=64, cfg=qcfg(4, 64, desc_act=desc_act))
    fmt_ = load(d)
    assert not fmt_.scheme_for(P).act_order
    assert "g_idx" not in read_canonical(d, fmt_)[0][P].tensors


def test_act_order_from_the_tensor_even_when_the_config_says_no(tmp_path):
    d, *_ = one_module(tmp_path, group=64, g_idx=act_order_g_idx(256, 64), cfg=qcfg(4, 64, desc_act=False))
    assert load(d).scheme_for(P).act_order


def _two_layer_dir(tmp_path, cfg, names, bits_of=lambda p: 4):
    tensors = {}
    for i, prefix in enumerate(names):
        b = bits_of(prefix)
        q, scales, zeros, g_idx = rtn(torch.randn(64, 128), b, 32, True)
        tensors.update({f"{prefix}.{k}": v for k, v in gptq_tensors(q, scales, zeros, g_idx, b).items()})
    write_dir(str(tmp_path), tensors, cfg, TINY_CONFIG)
    return load(str(tmp_path))


def test_dynamic_overrides_first_match_wins(tmp_path):
    dyn = {r"+:.*layers\.0\..*down_proj": {"bits": 8}, r".*layers\.1\..*": {"group_size": 32, "sym": True},
           r"-:.*layers\.2\..*": {}, r".*": {"bits": 2}}  # the catch-all only reaches unmatched modules
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    fmt_ = _two_layer_dir(tmp_path, qcfg(4, 32, dynamic=dyn), names, lambda p: 8 if "layers.0" in p else 4)
    assert fmt_.scheme_for(names[0]).weight_dtype == "int8"
    assert fmt_.scheme_for(names[1]) == QuantScheme("int4", "group", group_size=32)
    assert fmt_.scheme_for("model.layers.2.mlp.down_proj") is None  # skipped, no qweight


def test_dynamic_skip_contradicting_a_qweight_fails(tmp_path):
    with pytest.raises(FormatError, match=re.escape("model.layers.1.mlp.up_proj.qweight")):
        _two_layer_dir(tmp_path, qcfg(4, 32, dynamic={r"-:.*layers\.1\.mlp\..*": {}}), ["model.layers.1.mlp.up_proj"])


def test_modules_in_block_to_quantize(tmp_path):
    cfg = qcfg(4, 32, modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj"], ["mlp.up_proj"]])
    fmt_ = _two_layer_dir(tmp_path, cfg, [P, "model.layers.0.mlp.up_proj"])
    assert fmt_.scheme_for(P) is not None and fmt_.scheme_for("model.layers.0.mlp.down_proj") is None
    with pytest.raises(FormatError, match=re.escape("model.layers.0.mlp.down_proj.qweight")):
        _two_layer_dir(tmp_path, cfg, ["model.layers.0.mlp.down_proj"])


def test_lm_head_only_when_the_config_says_so(tmp_path):
    assert _two_layer_dir(tmp_path, qcfg(4, 32, lm_head=True), ["lm_head"]).scheme_for("lm_head") is not None
    with pytest.raises(FormatError, match=re.escape("lm_head.qweight")):
        _two_layer_dir(tmp_path, qcfg(4, 32), ["lm_head"])


def test_legacy_quantize_config_json(tmp_path):
    legacy = {"bits": 4, "group_size": 64, "sym": True, "desc_act": False, "model_file_base_name": "model"}
    d, *_ = one_module(tmp_path, group=64, legacy=("quantize_config.json", legacy))
    cfg = load_config(d)
    assert cfg.quantization is None and GPTQFormat.matches(d, cfg)
    assert GPTQFormat.from_checkpoint(d, cfg).scheme_for(P) == QuantScheme("int4", "group", group_size=64)


# ---- malformed checkpoints: each error names the tensor or value and what is supported ------------


def _edit(tmp_path, drop=(), replace=None, cfg=None, **kw):
    d, *_ = one_module(tmp_path, **kw)
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(d, "model.safetensors"))
    for leaf in drop:
        tensors.pop(f"{P}.{leaf}")
    tensors.update({f"{P}.{k}": v for k, v in (replace or {}).items()})
    write_dir(d, tensors, cfg or qcfg(kw.get("bits", 4), kw.get("group", 128), kw.get("sym", True),
                                      fmt=kw.get("fmt", "gptq")), TINY_CONFIG)
    return d


@pytest.mark.parametrize("leaf", ["scales", "qzeros"])
def test_missing_scales_or_qzeros(tmp_path, leaf):
    d = _edit(tmp_path, drop=[leaf])
    with pytest.raises(FormatError, match=re.escape(f"{P}.{leaf} is missing")):
        load(d)


def test_qweight_rows_disagree_with_g_idx(tmp_path):
    d = _edit(tmp_path, replace={"qweight": torch.zeros(30, 64, dtype=torch.int32)})
    with pytest.raises(FormatError, match=re.escape(f"{P}.qweight has 30 rows")):
        load(d)


def test_qweight_rows_disagree_with_scales_groups(tmp_path):
    d = _edit(tmp_path, drop=["g_idx"], replace={"qweight": torch.zeros(48, 64, dtype=torch.int32)})  # K = 384
    with pytest.raises(FormatError, match=re.escape(f"{P}.scales has shape [2, 64], but {P}.qweight [48, 64]")):
        load(d)


def test_group_size_must_divide_k(tmp_path):
    # K = 96 from qweight [12, N], G = 64: ceil gives 2 scale rows, but GPTQ packs whole groups
    d = _edit(tmp_path, drop=["g_idx"], group=64,
              replace={"qweight": torch.zeros(12, 64, dtype=torch.int32), "scales": torch.ones(2, 64).half(),
                       "qzeros": torch.zeros(2, 8, dtype=torch.int32)})
    msg = f"{P}.qweight: in-features K=96 is not a multiple of group_size 64"
    with pytest.raises(FormatError, match=re.escape(msg)):
        load(d)


def test_wrong_qzeros_shape(tmp_path):
    d = _edit(tmp_path, replace={"qzeros": torch.zeros(2, 4, dtype=torch.int32)})
    with pytest.raises(FormatError, match=re.escape(f"{P}.qzeros has shape [2, 4]")):
        load(d)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_symmetric_zeros_must_be_the_constant(tmp_path, fmt):
    zeros = torch.full((2, 64), 8 if fmt == "gptq_v2" else 7)
    zeros[1, 5] = 3
    d = _edit(tmp_path, fmt=fmt, replace={"qzeros": pack_last(zeros.numpy(), 4)})
    fmt_ = load(d)
    with pytest.raises(FormatError, match=re.escape(f"{P}.qzeros: a symmetric {fmt} checkpoint")):
        read_canonical(d, fmt_)


def test_v1_zero_overflow_warns(tmp_path):
    d, *_ = one_module(tmp_path, sym=False, fmt="gptq", cfg=qcfg(sym=False))
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors[f"{P}.qzeros"][0, 0] = -1  # AutoGPTQ packing a true zero of 0 as -1: every nibble of the word is 15
    write_dir(d, tensors, qcfg(sym=False), TINY_CONFIG)
    with pytest.warns(UserWarning, match=re.escape(f"{P}.qzeros: 8 zero points read as 16")):
        read_canonical(d, load(d))


def test_g_idx_out_of_range(tmp_path):
    d = _edit(tmp_path, replace={"g_idx": torch.full((256,), 5, dtype=torch.int32)})
    with pytest.raises(FormatError, match=re.escape(f"{P}.g_idx holds groups 5..5")):
        load(d)


@pytest.mark.parametrize("bits, err, msg", [(3, NotImplementedError, "3-bit weights are not supported"),
                                            (2, NotImplementedError, "2/3-bit"), (5, FormatError, "bits=5")])
def test_unsupported_bits(tmp_path, bits, err, msg):
    d = _edit(tmp_path, cfg=qcfg(bits=bits))
    with pytest.raises(err, match=re.escape(msg)):
        load(d)


@pytest.mark.parametrize("fmt", ["marlin", "bitblas", "qqq"])
def test_unsupported_checkpoint_format(tmp_path, fmt):
    d = _edit(tmp_path, cfg=qcfg(fmt=fmt))
    with pytest.raises(NotImplementedError, match=re.escape(f"checkpoint_format {fmt!r} is not supported; "
                                                            "supported: ('gptq', 'gptq_v2')")):
        load(d)


def test_unknown_quant_method(tmp_path):
    d = _edit(tmp_path, cfg={**qcfg(), "quant_method": "hqq"})
    assert not GPTQFormat.matches(d, load_config(d))
    with pytest.raises(FormatError, match="quant_method 'hqq' is not GPTQ"):
        load(d)
    with pytest.raises(NotImplementedError, match="quant_method='hqq'"):
        detect_format(d, load_config(d))


# ---- writer ---------------------------------------------------------------------------------------


def _canonical(n, k, scheme: QuantScheme, seed=0, bias=False):
    """A canonical module from the test quantizer, packed with the test's own packer."""
    torch.manual_seed(seed)
    g_idx = act_order_g_idx(k, scheme.group_size, seed) if scheme.act_order else None
    q, scales, zeros, g_idx = rtn(torch.randn(n, k), scheme.bits, scheme.group_size or -1, scheme.symmetric, g_idx,
                                  min_zero=1)
    t = {"qweight": pack_last(q.numpy(), scheme.bits), "scales": scales}
    if not scheme.symmetric:
        t["zeros"] = zeros.int()
    if scheme.act_order:
        t["g_idx"] = g_idx
    if bias:
        t["bias"] = torch.randn(n)
    return QuantizedModule(scheme, t)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_writer_reader_bit_identical(tmp_path, fmt):
    w4 = QuantScheme("int4", "group", group_size=32)
    modules = {
        "model.layers.0.self_attn.q_proj": _canonical(64, 64, w4, 1, bias=True),
        "model.layers.0.self_attn.k_proj": _canonical(32, 64, w4, 2),
        "model.layers.0.self_attn.o_proj": _canonical(64, 64, QuantScheme("int4", "group", group_size=32,
                                                                          symmetric=False, act_order=True), 3),
        "model.layers.0.mlp.down_proj": _canonical(64, 96, QuantScheme("int8", "channel", symmetric=False), 4),
        "lm_head": _canonical(32, 64, QuantScheme("int8", "group", group_size=64), 5),
    }
    plain = {"model.embed_tokens.weight": torch.randn(32, 64), "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64),
             "model.norm.weight": torch.randn(64)}
    save_checkpoint(str(tmp_path), TINY_CONFIG, modules, plain, checkpoint_format=fmt, max_shard_size=20_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")  # sharded
    cfg = load_config(str(tmp_path))
    q = cfg.quantization
    assert (q["checkpoint_format"], q["bits"], q["group_size"], q["sym"], q["desc_act"], q["lm_head"]) == \
        (fmt, 4, 32, True, True, True)
    assert r"-:^model\.layers\.0\.mlp\.up_proj$" in q["dynamic"]
    got, got_plain = read_canonical(str(tmp_path), detect_format(str(tmp_path), cfg))
    assert set(got) == set(modules) and set(got_plain) == set(plain)
    for prefix, mod in modules.items():
        assert got[prefix].scheme == mod.scheme, prefix
        assert set(got[prefix].tensors) == set(mod.tensors), prefix
        for leaf, t in mod.tensors.items():
            assert got[prefix].tensors[leaf].dtype == t.dtype and torch.equal(got[prefix].tensors[leaf], t), leaf
    assert all(torch.equal(got_plain[k], v) for k, v in plain.items())


def test_writer_v1_refuses_a_zero_of_zero(tmp_path):
    mod = _canonical(32, 64, QuantScheme("int4", "group", group_size=32, symmetric=False))
    mod.tensors["zeros"][3, 1] = 0
    with pytest.raises(ValueError, match=re.escape(f"{P}.zeros: a zero point of 0 cannot be written as GPTQ v1")):
        save_checkpoint(str(tmp_path / "v1"), TINY_CONFIG, {P: mod}, {})
    save_checkpoint(str(tmp_path / "v2"), TINY_CONFIG, {P: mod}, {}, checkpoint_format="gptq_v2")
    got = read_canonical(str(tmp_path / "v2"), load(str(tmp_path / "v2")))[0][P]
    assert torch.equal(got.tensors["zeros"], mod.tensors["zeros"])


def test_writer_refuses_lossy_scales_and_other_schemes(tmp_path):
    mod = _canonical(32, 64, QuantScheme("int4", "group", group_size=32))
    mod.tensors["scales"] = mod.tensors["scales"] + 1e-6
    with pytest.raises(ValueError, match=re.escape(f"{P}.scales: scales are not exactly representable")):
        save_checkpoint(str(tmp_path / "a"), TINY_CONFIG, {P: mod}, {})
    save_checkpoint(str(tmp_path / "b"), TINY_CONFIG, {P: mod}, {}, scale_dtype=torch.float32)
    assert torch.equal(read_canonical(str(tmp_path / "b"), load(str(tmp_path / "b")))[0][P].tensors["scales"],
                       mod.tensors["scales"])
    fp8 = QuantizedModule(QuantScheme("fp8_e4m3", "channel"), {})
    with pytest.raises(ValueError, match=re.escape(f"{P}: GPTQ cannot store w8a16_fp8")):
        save_checkpoint(str(tmp_path / "c"), TINY_CONFIG, {P: fp8}, {})


# ---- end to end: quantized tiny models through lowbit vs transformers on the dequantized weights ----

def _all(settings):
    return lambda prefix: None if prefix == "lm_head" else settings


def _qwen3_dynamic(prefix):  # mirrors the dynamic rules of the case below, written out by hand
    if prefix == "lm_head" or prefix.endswith("down_proj"):
        return dict(bits=4 if prefix == "lm_head" else 8, group_size=64, sym=True)
    return None if ".layers.1.mlp." in prefix else dict(bits=4, group_size=64, sym=True)


E2E = {  # arch, HF overrides, which modules get which settings, checkpoint_format, quantization_config
    "llama-v1-sym-g32": ("llama", {}, _all(dict(bits=4, group_size=32, sym=True)), "gptq", qcfg(4, 32)),
    "llama-v2-asym-actorder": ("llama", {}, _all(dict(bits=4, group_size=32, sym=False, g_idx_fn=act_order_g_idx)),
                               "gptq_v2", qcfg(4, 32, False, desc_act=True, fmt="gptq_v2")),
    "qwen2-bias-v1-asym-int8-channel": ("qwen2", {}, _all(dict(bits=8, group_size=-1, sym=False, min_zero=1)), "gptq",
                                        qcfg(8, -1, False)),
    "qwen3-v2-dynamic-lm_head": ("qwen3", {"intermediate_size": 128}, _qwen3_dynamic, "gptq_v2",
                                 qcfg(4, 64, fmt="gptq_v2", lm_head=True,
                                      dynamic={r"+:.*down_proj": {"bits": 8}, r"-:.*layers\.1\.mlp\..*": {}})),
    "llama-modules_in_block": ("llama", {}, lambda p: dict(bits=4, group_size=32, sym=True) if "attn" in p else None,
                               "gptq", qcfg(4, 32, modules_in_block_to_quantize=[
                                   ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                   ["self_attn.o_proj"]])),
}


@pytest.mark.parametrize("case", sorted(E2E))
def test_quantized_model_matches_transformers(tmp_path, case):
    arch, overrides, pick, fmt, cfg = E2E[case]
    hf = make_hf_model(arch, str(tmp_path), seed=7, **overrides)
    def pack(q, scales, zeros, g_idx, s):
        return gptq_tensors(q, scales, zeros, g_idx, s["bits"], fmt)

    tensors = quantize_hf_model(hf, str(tmp_path), pick, pack)
    write_dir(str(tmp_path), tensors, cfg)
    fmt_ = detect_format(str(tmp_path), load_config(str(tmp_path)))
    assert isinstance(fmt_, GPTQFormat)
    assert sorted(fmt_.schemes) == sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    compare_with_hf(str(tmp_path), hf)


def test_writer_output_loads_end_to_end(tmp_path):
    """Canonical modules -> save_checkpoint (gptq_v2, act-order, Qwen2 biases) -> lowbit vs transformers."""
    hf = make_hf_model("qwen2", str(tmp_path / "src"), seed=3)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    modules = {}
    for name in [k for k in state if k.endswith("proj.weight")]:
        prefix = name[: -len(".weight")]
        w = state.pop(name)
        q, scales, zeros, g_idx = rtn(w, 4, 32, False, act_order_g_idx(w.shape[1], 32, zlib.crc32(prefix.encode())))
        with torch.no_grad():
            hf.get_submodule(prefix).weight.copy_(dequant(q, scales, zeros, g_idx))
        t = {"qweight": pack_last(q.numpy(), 4), "scales": scales, "zeros": zeros.int(), "g_idx": g_idx}
        if f"{prefix}.bias" in state:
            t["bias"] = state.pop(f"{prefix}.bias")
        scheme = QuantScheme("int4", "group", group_size=32, symmetric=False, act_order=True)
        modules[prefix] = QuantizedModule(scheme, t)
    import json

    with open(tmp_path / "src" / "config.json") as f:
        config = json.load(f)
    save_checkpoint(str(tmp_path / "out"), config, modules, state, checkpoint_format="gptq_v2")
    compare_with_hf(str(tmp_path / "out"), hf)
