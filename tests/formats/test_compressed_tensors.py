"""compressed-tensors: llm-compressor checkpoints in (against compressed-tensors' own decompression and
transformers' logits), lowbit's writer out (loaded back by lowbit and by transformers), malformed input refused.

Checkpoints come from the real producer (tests/formats/ct_fixtures.py). transformers loads them through
compressed-tensors, whose forward hooks fake-quantize fp8 input activations exactly as the scheme says
(per tensor / token / token-group 128, amax / 448, e4m3 round trip) — the same math as lowbit's reference
backend — so logits are compared with one fp32 tolerance for every scheme.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lowbit.config import load_config
from lowbit.formats.base import FormatError, QuantizedModule, detect_format, read_canonical
from lowbit.formats.compressed_tensors import CompressedTensorsFormat, save_checkpoint
from lowbit.kernels import reference as ref
from lowbit.scheme import QuantScheme
from tests.formats.ct_fixtures import CASES, edited_copy, make_act_order_group, produce
from tests.helpers import VOCAB, Stepper

EXPECT = {  # case -> scheme of layers.0.self_attn.q_proj, as lowbit describes it
    "w4a16": "w4a16 (weights int4 g128 sym, activations 16-bit)",
    "w4a16_asym": "w4a16 (weights int4 g128 asym, activations 16-bit)",
    "w8a16_qwen2": "w8a16 (weights int8 g128 sym, activations 16-bit)",
    "int_groups": "w4a16 (weights int4 per-channel asym, activations 16-bit)",
    "fp8_static": "w8a8_fp8 (weights fp8_e4m3 per-tensor, activations fp8 tensor_static)",
    "fp8_dynamic_qwen3": "w8a8_fp8 (weights fp8_e4m3 per-channel, activations fp8 token)",
    "fp8_block": "w8a8_fp8_block (weights fp8_e4m3 block 128x128, activations fp8 token_group 128)",
    "w4afp8_int": "w4a8 (weights int4 g128 sym, activations fp8 token)",
    "w4afp8_pack_qwen2": "w4a8 (weights int4 g128 sym, activations fp8 token)",
    "gptq": "w4a16 (weights int4 g128 sym, activations 16-bit)",
}
FAST = [c for c in CASES if c != "gptq"]
CASE_PARAMS = FAST + [pytest.param("gptq", marks=pytest.mark.slow)]
Q = "model.layers.0.self_attn.q_proj"
LOGIT_ATOL = 1e-4  # fp32 on both sides; observed <= 2e-5


@pytest.fixture(scope="module")
def ct(tmp_path_factory, tiny_tokenizer_dir):
    root = str(tmp_path_factory.mktemp("ct"))
    return lambda case: produce(root, case, tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def act_order(tmp_path_factory, tiny_tokenizer_dir):
    return make_act_order_group(str(tmp_path_factory.mktemp("ct_act")), tiny_tokenizer_dir)


def reader(path: str) -> CompressedTensorsFormat:
    fmt = detect_format(path, load_config(path))
    assert isinstance(fmt, CompressedTensorsFormat)
    return fmt


def dequant(mod: QuantizedModule, k: int) -> torch.Tensor:
    s, t = mod.scheme, mod.tensors
    if s.is_int:
        return ref.dequantize_int(t["qweight"], t["scales"], t.get("zeros"), t.get("g_idx"), s.bits,
                                  s.effective_group(k), k)
    scale = t["weight_scale"].reshape(1) if s.weight_granularity == "tensor" else t["weight_scale"]
    return ref.dequantize_fp8(t["weight"], scale, s.weight_granularity, [t["weight"].shape[0]], s.block_size)


def hf_model(path: str, dequantize: bool = True):
    import transformers
    from transformers import CompressedTensorsConfig

    qc = CompressedTensorsConfig(dequantize=True) if dequantize else None
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=qc).eval()


PROMPTS, DECODE = (5, 11), 2


def compare_logits(path: str, hf) -> None:
    """lowbit (paged KV cache, prefill + decode steps) against transformers on the full sequences."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (n + DECODE,), generator=g).tolist() for n in PROMPTS]
    stepper = Stepper(path)
    handles = [stepper.add(s[:n]) for s, n in zip(seqs, PROMPTS)]
    got = {h.seq_id: [] for h in handles}
    for step in range(DECODE + 1):
        forced = {h.seq_id: s[n + step] for h, s, n in zip(handles, seqs, PROMPTS) if step < DECODE}
        for sid, row in stepper.step(forced).items():
            got[sid].append(row)
    for h, s, n in zip(handles, seqs, PROMPTS):
        with torch.no_grad():
            want = hf(torch.tensor([s])).logits[0, n - 1: n + DECODE]
        diff = (torch.stack(got[h.seq_id]) - want).abs().max().item()
        assert diff < LOGIT_ATOL, f"{path}: prompt of {n}: lowbit vs transformers logits differ by {diff:.3g}"


def assert_same_canonical(a, b) -> None:
    (ma, pa), (mb, pb) = a, b
    assert ma.keys() == mb.keys() and pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and torch.equal(pa[name], pb[name]), name
    for prefix in ma:
        assert ma[prefix].scheme == mb[prefix].scheme, prefix
        ta, tb = ma[prefix].tensors, mb[prefix].tensors
        assert ta.keys() == tb.keys(), prefix
        for leaf in ta:
            x, y = ta[leaf], tb[leaf]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{prefix}.{leaf}"
            bits = (lambda t: t.view(torch.uint8)) if x.dtype == torch.float8_e4m3fn else (lambda t: t)
            assert torch.equal(bits(x), bits(y)), f"{prefix}.{leaf} differs after the round trip"


# ---- reading llm-compressor output ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_reader_matches_compressed_tensors(ct, case):
    path = ct(case)
    modules, plain = read_canonical(path, reader(path))
    assert modules[Q].scheme.describe() == EXPECT[case]
    hf = hf_model(path)  # compressed-tensors decompresses every module on load
    for prefix, mod in modules.items():
        want = hf.get_submodule(prefix).weight.detach()
        got = dequant(mod, want.shape[1])
        assert torch.equal(got.to(want.dtype), want), f"{case}: {prefix} dequantizes differently"
        if "bias" in mod.tensors:
            assert torch.equal(mod.tensors["bias"], hf.get_submodule(prefix).bias.detach())
    compare_logits(path, hf)


def test_which_modules_are_quantized(ct):
    path = ct("int_groups")  # per-group regex targets; ignore: lm_head + layers.1 down_proj; o_proj untargeted
    fmt = reader(path)
    asym4 = QuantScheme("int4", "channel", symmetric=False)
    int8 = QuantScheme("int8", "channel")
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        assert fmt.scheme_for(f"{p}.self_attn.k_proj") == asym4
        assert fmt.scheme_for(f"{p}.self_attn.o_proj") is None
        assert fmt.scheme_for(f"{p}.mlp.gate_proj") == int8
    assert fmt.scheme_for("model.layers.0.mlp.down_proj") == int8
    assert fmt.scheme_for("model.layers.1.mlp.down_proj") is None
    assert fmt.scheme_for("lm_head") is None and fmt.scheme_for("model.embed_tokens") is None
    info = fmt.describe()
    assert info["quantized_modules"] == 11 and "model.layers.1.mlp.down_proj" in info["ignore"]


def test_act_order_group(act_order):
    path, want = act_order
    modules, _ = read_canonical(path, reader(path))
    assert modules[Q].scheme == QuantScheme("int4", "group", group_size=64, act_order=True)
    for prefix, w in want.items():
        assert torch.equal(dequant(modules[prefix], w.shape[1]), w), prefix
    hf = hf_model(os.path.join(os.path.dirname(path), "base_llama"), dequantize=False)
    with torch.no_grad():
        for prefix, w in want.items():
            hf.get_submodule(prefix).weight.copy_(w)
    compare_logits(path, hf)


# ---- writing --------------------------------------------------------------------------------------------


def _config_without_quant(path: str) -> dict:
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.pop("quantization_config")
    return cfg


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_writer_round_trip_and_transformers_loads_it(ct, tmp_path, case):
    src = ct(case)
    canonical = read_canonical(src, reader(src))
    out = str(tmp_path / "out")
    shard = 400_000 if case == "w4a16" else 5 * 2**30  # several shards + index for one case
    save_checkpoint(out, _config_without_quant(src), *canonical, ignore=["lm_head"], max_shard_size=shard)
    if case == "w4a16":
        assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert_same_canonical(canonical, read_canonical(out, reader(out)))
    written = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    original = json.load(open(os.path.join(src, "config.json")))["quantization_config"]
    if len(original["config_groups"]) == 1:
        assert written["config_groups"]["group_0"]["targets"] == original["config_groups"]["group_0"]["targets"] == ["Linear"]
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic")
    weights = lambda qc: sorted(tuple(str((g["weights"] or {}).get(k)) for k in keys) for g in qc["config_groups"].values())
    assert weights(written) == weights(original)  # the same weight schemes (group names and order may differ)
    assert "lm_head" in written["ignore"] and written["quantization_status"] == "compressed"
    # transformers 5.17 on the CPU loads compressed-tensors checkpoints only by decompressing them
    # (dequantize=True); without it the packed tensors are reported UNEXPECTED and the Linears stay random
    compare_logits(out, hf_model(out))


def test_writer_act_order_round_trip(act_order, tmp_path):
    path, _ = act_order
    canonical = read_canonical(path, reader(path))
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="actorder 'group'"):
        save_checkpoint(out, _config_without_quant(path), *canonical)
    assert_same_canonical(canonical, read_canonical(out, reader(out)))


def test_writer_scale_dtype(ct, tmp_path):
    from safetensors import safe_open

    src = ct("w4a16")
    modules, plain = read_canonical(src, reader(src))
    cfg = dict(_config_without_quant(src), dtype="bfloat16")
    for rounded in (False, True):
        if rounded:  # scales a bf16 quantizer would produce: written in the model dtype, as llm-compressor does
            for m in modules.values():
                m.tensors["scales"] = m.tensors["scales"].to(torch.bfloat16).float()
        out = str(tmp_path / f"out{int(rounded)}")
        save_checkpoint(out, cfg, modules, plain)
        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            assert f.get_slice(f"{Q}.weight_scale").get_dtype() == ("BF16" if rounded else "F32")
        assert_same_canonical((modules, plain), read_canonical(out, reader(out)))


def test_writer_refuses(ct, tmp_path):
    src = ct("w4a16_asym")
    modules, plain = read_canonical(src, reader(src))
    cfg = _config_without_quant(src)
    with pytest.raises(ValueError, match="both quantized and listed in ignore"):
        save_checkpoint(str(tmp_path / "a"), cfg, modules, plain, ignore=[Q])
    mod = modules[Q]
    for tensors, err, msg in [
        ({k: v for k, v in mod.tensors.items() if k != "zeros"}, ValueError, f"{Q}: .*missing \\['zeros'\\]"),
        (dict(mod.tensors, scales=mod.tensors["scales"][:, :1]), ValueError, f"{Q}.scales has shape"),
    ]:
        with pytest.raises(err, match=msg):
            save_checkpoint(str(tmp_path / "b"), cfg, {Q: QuantizedModule(mod.scheme, tensors)}, {})
    smooth = QuantScheme("int4", "group", group_size=128, input_smoothing=True)
    with pytest.raises(NotImplementedError, match="pre_quant_scale"):
        save_checkpoint(str(tmp_path / "c"), cfg, {Q: QuantizedModule(smooth, dict(mod.tensors))}, {})


# ---- targets, ignore, malformed and unsupported input ---------------------------------------------------


def _group(weights, inputs=None, targets=("Linear",), fmt=None):
    g = {"targets": list(targets), "weights": weights, "input_activations": inputs}
    return dict(g, format=fmt) if fmt else g


INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
FP8W = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
FP8A = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


def _qcfg(groups, ignore=(), fmt="pack-quantized", **extra):
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": groups, "ignore": list(ignore),
            "quantization_status": "compressed", **extra}


def test_target_precedence_and_ignore():
    fmt = CompressedTensorsFormat(_qcfg({
        "everything": _group(INT4, fmt="pack-quantized"),
        "downs": _group({**INT4, "num_bits": 8, "strategy": "channel", "group_size": None},
                        targets=[r"re:.*mlp\.down_proj$"], fmt="pack-quantized"),
        "one": _group(FP8W, FP8A, targets=["model.layers.0.mlp.down_proj"], fmt="float-quantized"),
    }, ignore=["lm_head", r"re:.*layers\.1\.self_attn\..*", "re:mlp"], fmt="mixed-precision"))
    assert fmt.scheme_for("model.layers.0.mlp.down_proj").weight_dtype == "fp8_e4m3"  # exact name beats regex
    assert fmt.scheme_for("model.layers.1.mlp.down_proj").weight_dtype == "int8"  # regex beats the class
    assert fmt.scheme_for("model.layers.1.mlp.up_proj").weight_dtype == "int4"  # re.match is anchored at 0
    assert fmt.scheme_for("model.layers.0.self_attn.q_proj").weight_dtype == "int4"
    assert fmt.scheme_for("model.layers.1.self_attn.q_proj") is None  # regex ignore
    assert fmt.scheme_for("lm_head") is None  # exact ignore
    later = CompressedTensorsFormat(_qcfg({"a": _group(INT4), "b": _group({**INT4, "group_size": 64})}))
    assert later.scheme_for(Q).group_size == 64  # the same target string in two groups: the later one


def _drop(key):
    return lambda t: t.pop(key)


@pytest.mark.parametrize("what, config_edit, tensor_edit, err, msg", [
    ("missing scale", None, _drop(f"{Q}.weight_scale"), FormatError, f"{Q}.weight_scale is missing"),
    ("missing shape", None, _drop(f"{Q}.weight_shape"), FormatError, f"{Q}.weight_shape is missing"),
    ("scale shape", None, lambda t: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"][:, :1]),
     FormatError, f"{Q}.weight_scale has shape \\[256, 1\\]"),
    ("packed shape", None, lambda t: t.__setitem__(f"{Q}.weight_packed", t[f"{Q}.weight_packed"][:, :16]),
     FormatError, f"{Q}.weight_packed has shape \\[256, 16\\]"),
    ("weight_shape value", None, lambda t: t.__setitem__(f"{Q}.weight_shape", torch.tensor([256, 128])),
     FormatError, f"{Q}.weight_packed has shape"),
    ("stray input_scale", None, lambda t: t.__setitem__(f"{Q}.input_scale", torch.ones(1)),
     FormatError, f"{Q}: unexpected tensors \\['input_scale'\\]"),
    ("group does not divide K", lambda c: c["config_groups"]["group_0"]["weights"].update(group_size=96), None,
     ValueError, "group_size 96 does not divide in-features K=256"),
    ("unknown format", lambda c: c["config_groups"]["group_0"].update(format="pack-quantised"), None,
     ValueError, "unknown format 'pack-quantised'"),
    ("quantized but ignored", lambda c: c["ignore"].append(Q), None, FormatError, f"{Q}: stored quantized"),
    ("format disagrees", lambda c: c["config_groups"]["group_0"].update(format="naive-quantized"), None,
     FormatError, r"\.weight is missing; .* stored as compressed-tensors naive-quantized"),
])
def test_malformed_checkpoint(ct, tmp_path, what, config_edit, tensor_edit, err, msg):
    path = edited_copy(ct("w4a16"), str(tmp_path / "bad"), config_edit, tensor_edit)
    with pytest.raises(err, match=msg):
        reader(path)


def test_malformed_fp8_is_refused_before_loading(ct, tmp_path):
    path = edited_copy(ct("fp8_static"), str(tmp_path / "bad"), None, _drop(f"{Q}.input_scale"))
    with pytest.raises(FormatError, match=f"{Q}.input_scale is missing"):
        Stepper(path)  # the loader's detection path: nothing is built before the checkpoint is checked


@pytest.mark.parametrize("qcfg, err, msg", [
    (_qcfg({"g": _group({**INT4, "num_bits": 2})}), NotImplementedError, "2-bit int weights"),
    (_qcfg({"g": _group({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16})},
           fmt="nvfp4-pack-quantized"), NotImplementedError, "format 'nvfp4-pack-quantized' is not supported"),
    (_qcfg({"g": _group({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16})},
           fmt="float-quantized"), NotImplementedError, "4-bit float weights"),
    (_qcfg({"g": _group({**FP8W, "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"})},
           fmt="float-quantized"), NotImplementedError, "scale_dtype 'torch.uint8'"),
    (_qcfg({"g": _group(INT4)}, sparsity_config={"format": "sparse-24-bitmask"}), NotImplementedError,
     "sparsity format 'sparse-24-bitmask'"),
    (_qcfg({"g": _group(INT4)}, kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"}),
     NotImplementedError, "kv_cache_scheme"),
    (_qcfg({"g": _group({**INT4, "num_bits": 8, "strategy": "channel", "group_size": None},
                        {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True})}, fmt="int-quantized"),
     NotImplementedError, "int8 activations are not supported"),
    (_qcfg({"g": {"targets": ["re:.*self_attn$"], "input_activations": FP8A}}), NotImplementedError,
     "activation-only"),
    (_qcfg({"g": _group(INT4, targets=["Embedding"])}), NotImplementedError, "\\['Embedding'\\] name module classes"),
    (_qcfg({"W4A16": ["Linear"]}), NotImplementedError, "preset name"),
    (_qcfg({"g": _group(INT4)}, quantization_status="frozen"), NotImplementedError, "quantization_status 'frozen'"),
    (_qcfg({"g": _group(INT4)}, transform_config={"config_groups": {"u": {}}}), NotImplementedError, "transform"),
    (_qcfg({"g": _group(FP8W)}), FormatError, "format 'pack-quantized' cannot hold fp8 weights"),
    (_qcfg({"g": _group(INT4)}, fmt="mixed-precision"), FormatError, "no per-group `format`"),
])
def test_unsupported_config(qcfg, err, msg):
    with pytest.raises(err, match=msg):
        CompressedTensorsFormat(qcfg)
