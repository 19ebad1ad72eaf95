"""AWQ (GEMM) reader and writer against checkpoints built independently from the documented layout.

AutoAWQ cannot be installed here (CUDA builds), so gptq_fixtures.py re-creates its tensors from formats.md §2
with a numpy packer of its own: qweight [K, N/8] and qzeros [K/G, N/8] packed along N with the nibble order
[0, 2, 4, 6, 1, 3, 5, 7], scales [K/G, N] fp16, true zero points.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from lowbit.config import load_config
from lowbit.formats.awq import AWQFormat, canonical_qweight, save_checkpoint
from lowbit.formats.base import FormatError, QuantizedModule, detect_format, read_canonical
from lowbit.kernels.reference import dequantize_int
from lowbit.scheme import QuantScheme
from tests.formats.gptq_fixtures import (AWQ_ORDER, TINY_CONFIG, awq_tensors, compare_with_hf, dequant, pack_last,
                                         quantize_hf_model, rtn, unpack_last, write_dir)
from tests.helpers import make_hf_model

P = "model.layers.0.mlp.up_proj"


def acfg(group_size=128, **extra):
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm", **extra}


def one_module(tmp_path, n=64, k=256, group=128, cfg=None, legacy=None, seed=0):
    torch.manual_seed(seed)
    q, scales, zeros, g_idx = rtn(torch.randn(n, k), 4, group, False)
    tensors = {f"{P}.{leaf}": t for leaf, t in awq_tensors(q, scales, zeros).items()}
    write_dir(str(tmp_path), tensors, None if legacy else cfg or acfg(group), TINY_CONFIG, legacy)
    return str(tmp_path), q, scales, zeros, g_idx


def load(model_dir):
    return AWQFormat.from_checkpoint(model_dir, load_config(model_dir))


def test_interleave_is_the_documented_one():
    # column j of each 8 sits in nibble slot AWQ_REVERSE_ORDER[j] = [0, 4, 1, 5, 2, 6, 3, 7][j]
    word = pack_last([[0, 1, 2, 3, 4, 5, 6, 7]], 4, AWQ_ORDER).item()
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == AWQ_ORDER
    assert (unpack_last([[word]], 4, AWQ_ORDER) == [[0, 1, 2, 3, 4, 5, 6, 7]]).all()


def test_qweight_conversion_in_row_blocks():
    q = torch.randint(0, 16, (24, 44))  # [N, K]: K spans several 16-row blocks and a partial one
    packed = pack_last(q.t().numpy(), 4, AWQ_ORDER)  # [K, N/8]
    assert torch.equal(canonical_qweight(packed, 24, rows_per_chunk=16), pack_last(torch.cat(
        [q, torch.zeros(24, 4, dtype=q.dtype)], 1).numpy(), 4))  # canonical pads K to whole words with zeros


@pytest.mark.parametrize("group", [-1, 32, 64, 128])
def test_reader_gives_canonical_tensors(tmp_path, group):
    d, q, scales, zeros, g_idx = one_module(tmp_path, group=group)
    fmt = load(d)
    scheme = fmt.scheme_for(P)
    want = QuantScheme("int4", "channel") if group == -1 else QuantScheme("int4", "group", group_size=group)
    assert scheme == QuantScheme(want.weight_dtype, want.weight_granularity, group_size=want.group_size,
                                 symmetric=False)
    assert fmt.scheme_for("model.layers.0.mlp.down_proj") is None and fmt.scheme_for("lm_head") is None
    t = read_canonical(d, fmt)[0][P].tensors
    assert set(t) == {"qweight", "scales", "zeros"}
    assert torch.equal(t["qweight"], pack_last(q.numpy(), 4))  # [N, K/8] sequential along K
    assert torch.equal(t["zeros"], zeros.int()) and torch.equal(t["scales"], scales)
    w = dequantize_int(t["qweight"], t["scales"], t["zeros"], None, 4, scheme.effective_group(256), 256)
    assert torch.equal(w, dequant(q, scales, zeros, g_idx))


def test_legacy_quant_config_json(tmp_path):
    legacy = {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}
    d, *_ = one_module(tmp_path, group=64, legacy=("quant_config.json", legacy))
    cfg = load_config(d)
    assert cfg.quantization is None and AWQFormat.matches(d, cfg)
    assert AWQFormat.from_checkpoint(d, cfg).scheme_for(P).group_size == 64


def test_modules_to_not_convert(tmp_path):
    d, *_ = one_module(tmp_path, cfg=acfg(modules_to_not_convert=["down_proj", "gate"]))
    fmt = load(d)
    assert fmt.scheme_for(P) is not None and fmt.scheme_for("model.layers.0.mlp.down_proj") is None
    d, *_ = one_module(tmp_path, cfg=acfg(modules_to_not_convert=["mlp.up_proj"]))
    with pytest.raises(FormatError, match=re.escape(f"{P}.qweight is on disk, but modules_to_not_convert")):
        load(d)


# ---- malformed checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["gemv", "gemv_fast", "marlin", "exllama", "GEMV"])
def test_other_versions_are_refused(tmp_path, version):
    d, *_ = one_module(tmp_path, cfg=acfg(version=version))
    msg = re.escape(f"AWQ version {version.lower()!r}") + r".*supported: \('gemm',\)"
    with pytest.raises(NotImplementedError, match=msg):
        load(d)


@pytest.mark.parametrize("bits, msg", [(8, "AWQ bits=8 is not supported"), (3, "2/3-bit")])
def test_bits_other_than_4(tmp_path, bits, msg):
    d, *_ = one_module(tmp_path, cfg=acfg(bits=bits))
    with pytest.raises(NotImplementedError, match=re.escape(msg)):
        load(d)


def test_zero_point_false_is_refused(tmp_path):
    d, *_ = one_module(tmp_path, cfg=acfg(zero_point=False))
    with pytest.raises(NotImplementedError, match="zero_point=false"):
        load(d)


def _edit(tmp_path, drop=(), replace=None, group=128):
    d, *_ = one_module(tmp_path, group=group)
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(d, "model.safetensors"))
    for leaf in drop:
        tensors.pop(f"{P}.{leaf}")
    tensors.update({f"{P}.{k}": v for k, v in (replace or {}).items()})
    write_dir(d, tensors, acfg(group), TINY_CONFIG)
    return d


@pytest.mark.parametrize("leaf", ["scales", "qzeros"])
def test_missing_scales_or_qzeros(tmp_path, leaf):
    with pytest.raises(FormatError, match=re.escape(f"{P}.{leaf} is missing")):
        load(_edit(tmp_path, drop=[leaf]))


def test_wrong_scales_shape(tmp_path):
    with pytest.raises(FormatError, match=re.escape(f"{P}.scales has shape [2, 32], but {P}.qweight [256, 8]")):
        load(_edit(tmp_path, replace={"scales": torch.ones(2, 32).half()}))


def test_wrong_qzeros_shape(tmp_path):
    with pytest.raises(FormatError, match=re.escape(f"{P}.qzeros has shape [2, 4]")):
        load(_edit(tmp_path, replace={"qzeros": torch.zeros(2, 4, dtype=torch.int32)}))


def test_group_size_must_divide_k(tmp_path):
    bad = {"qweight": torch.zeros(96, 8, dtype=torch.int32), "qzeros": torch.zeros(2, 8, dtype=torch.int32),
           "scales": torch.ones(2, 64).half()}
    msg = f"{P}.qweight: in-features K=96 is not a multiple of group_size 64"
    with pytest.raises(FormatError, match=re.escape(msg)):
        load(_edit(tmp_path, replace=bad, group=64))


def test_qweight_must_be_int32(tmp_path):
    with pytest.raises(FormatError, match=re.escape(f"{P}.qweight: I64 [256, 8]")):
        load(_edit(tmp_path, replace={"qweight": torch.zeros(256, 8, dtype=torch.int64)}))


# ---- writer ---------------------------------------------------------------------------------------


def _canonical(n, k, group, seed=0, bias=False):
    torch.manual_seed(seed)
    q, scales, zeros, _ = rtn(torch.randn(n, k), 4, group, False)
    t = {"qweight": pack_last(q.numpy(), 4), "scales": scales, "zeros": zeros.int()}
    if bias:
        t["bias"] = torch.randn(n).half()
    return QuantizedModule(QuantScheme("int4", "group", group_size=group, symmetric=False), t)


def test_writer_reader_bit_identical(tmp_path):
    modules = {"model.layers.0.self_attn.q_proj": _canonical(64, 64, 32, 1, bias=True),
               "model.layers.0.mlp.down_proj": _canonical(64, 96, 32, 2)}
    plain = {"model.embed_tokens.weight": torch.randn(32, 64), "model.layers.0.mlp.gate.weight": torch.randn(4, 64)}
    save_checkpoint(str(tmp_path), TINY_CONFIG, modules, plain, ignore=["lm_head"], max_shard_size=4000)
    with open(tmp_path / "config.json") as f:
        q = json.load(f)["quantization_config"]
    assert q == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
                 "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"]}
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    got, got_plain = read_canonical(str(tmp_path), detect_format(str(tmp_path), load_config(str(tmp_path))))
    assert set(got) == set(modules)
    for prefix, mod in modules.items():
        assert got[prefix].scheme == mod.scheme
        assert set(got[prefix].tensors) == set(mod.tensors)
        for leaf, t in mod.tensors.items():
            assert got[prefix].tensors[leaf].dtype == t.dtype and torch.equal(got[prefix].tensors[leaf], t), leaf
    assert all(torch.equal(got_plain[k], v) for k, v in plain.items())


@pytest.mark.parametrize("scheme", [QuantScheme("int4", "group", group_size=32),
                                    QuantScheme("int8", "group", group_size=32, symmetric=False),
                                    QuantScheme("int4", "group", group_size=32, symmetric=False, act_order=True)])
def test_writer_refuses_what_awq_cannot_hold(tmp_path, scheme):
    with pytest.raises(ValueError, match=re.escape(f"{P}: AWQ GEMM stores int4 weights with zero points")):
        save_checkpoint(str(tmp_path), TINY_CONFIG, {P: QuantizedModule(scheme, {})}, {})


def test_writer_refuses_mixed_group_sizes(tmp_path):
    modules = {P: _canonical(64, 64, 32), "model.layers.0.mlp.down_proj": _canonical(64, 64, 64)}
    with pytest.raises(ValueError, match="one group_size per checkpoint"):
        save_checkpoint(str(tmp_path), TINY_CONFIG, modules, {})


# ---- end to end -----------------------------------------------------------------------------------

E2E = {  # arch, HF overrides, group size, modules_to_not_convert
    "llama-g32": ("llama", {}, 32, None),
    "qwen2-bias-channel-skip-down": ("qwen2", {}, -1, ["down_proj"]),
    "qwen3-g64": ("qwen3", {"intermediate_size": 128}, 64, None),
}


@pytest.mark.parametrize("case", sorted(E2E))
def test_quantized_model_matches_transformers(tmp_path, case):
    arch, overrides, group, skip = E2E[case]
    hf = make_hf_model(arch, str(tmp_path), seed=11, **overrides)

    def pick(prefix):  # AutoAWQ: every Linear in the blocks except modules_to_not_convert; never lm_head
        if prefix == "lm_head" or (skip and any(prefix.endswith(s) for s in skip)):
            return None
        return dict(bits=4, group_size=group, sym=False)

    tensors = quantize_hf_model(hf, str(tmp_path), pick, lambda q, s, z, g_idx, settings: awq_tensors(q, s, z))
    write_dir(str(tmp_path), tensors, acfg(group, modules_to_not_convert=skip))
    assert isinstance(detect_format(str(tmp_path), load_config(str(tmp_path))), AWQFormat)
    compare_with_hf(str(tmp_path), hf)


def test_writer_output_loads_end_to_end(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "src"), seed=5)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    modules = {}
    for name in [k for k in state if k.endswith("proj.weight") and "down_proj" not in k]:  # down_proj stays 16-bit
        prefix = name[: -len(".weight")]
        q, scales, zeros, g_idx = rtn(state.pop(name), 4, 32, False)
        with torch.no_grad():
            hf.get_submodule(prefix).weight.copy_(dequant(q, scales, zeros, g_idx))
        modules[prefix] = QuantizedModule(QuantScheme("int4", "group", group_size=32, symmetric=False),
                                          {"qweight": pack_last(q.numpy(), 4), "scales": scales, "zeros": zeros.int()})
    with open(tmp_path / "src" / "config.json") as f:
        config = json.load(f)
    save_checkpoint(str(tmp_path / "out"), config, modules, state)
    with open(tmp_path / "out" / "config.json") as f:
        assert "model.layers.1.mlp.down_proj" in json.load(f)["quantization_config"]["modules_to_not_convert"]
    compare_with_hf(str(tmp_path / "out"), hf)
