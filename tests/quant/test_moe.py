"""MoE models (transformers' fused 3-D experts: Qwen2-MoE, Qwen3-MoE, DeepSeek-V3): unfusing, routed-token GPTQ,
AWQ's shared smoothing, and checkpoints that transformers loads back with the logits of the quantized model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lowbit.quant.layerwise import MIN_TOKENS
from lowbit.quant.moe import UnfusedExperts, unfuse_experts
from lowbit.quant.pipeline import DEFAULT_IGNORE, quantize_hf_model
from lowbit.quant.recipes import make_recipe
from tests.helpers import VOCAB, make_hf_model

NUM_EXPERTS, LAYERS = 8, 2
NO_ATTENTION = tuple(DEFAULT_IGNORE) + (r"re:.*self_attn\..*",)  # layer 0's MoE input stays the bf16 model's


def _samples(n=4, t=24, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def moe_dir(request, tmp_path_factory, tiny_tokenizer_dir):
    out = str(tmp_path_factory.mktemp(request.param))
    make_hf_model(request.param, out, tokenizer_dir=tiny_tokenizer_dir, num_hidden_layers=LAYERS)
    return out


def _load(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _routed_counts(model, samples, layer: int) -> torch.Tensor:
    """Tokens transformers' own router sends to each expert of `layer` (a hook on the fused experts module)."""
    counts = torch.zeros(NUM_EXPERTS, dtype=torch.long)

    def hook(mod, args):
        counts.add_(torch.bincount(args[1].reshape(-1), minlength=NUM_EXPERTS))

    h = model.model.layers[layer].mlp.experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(input_ids=samples, use_cache=False)
    h.remove()
    return counts


def test_unfused_experts_compute_what_transformers_computes(moe_dir):
    model = _load(moe_dir)
    ids = _samples(2, 12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert unfuse_experts(model) == LAYERS
        got = model(input_ids=ids).logits
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {f"model.layers.1.mlp.experts.7.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= names
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_gptq_gives_each_expert_the_tokens_routed_to_it(moe_dir):
    samples = _samples(3, 20)  # 60 tokens x top-2 over 8 experts: some get fewer than MIN_TOKENS
    counts = _routed_counts(_load(moe_dir), samples, 0)
    model = _load(moe_dir)
    result = quantize_hf_model(model, make_recipe("w4a16-gptq", 32), samples, ignore=NO_ATTENTION, progress=False)
    reps = {r.name: r for r in result.reports}
    for e in range(NUM_EXPERTS):
        for p in ("gate_proj", "up_proj", "down_proj"):
            r = reps[f"model.layers.0.mlp.experts.{e}.{p}"]
            assert r.tokens == int(counts[e]), r.name
            assert r.note.startswith("RTN fallback") == (counts[e] < MIN_TOKENS), (r.name, r.note)
    assert (counts < MIN_TOKENS).any() and (counts >= MIN_TOKENS).any()  # both paths covered
    experts = [n for n in result.modules if ".experts." in n]
    assert len(experts) == LAYERS * NUM_EXPERTS * 3  # every expert of every layer, routed to or not
    gptq = [r for r in result.reports if ".experts." in r.name and r.rtn_error is not None]
    assert gptq and sum(r.error for r in gptq) < sum(r.rtn_error for r in gptq)


def test_awq_smooths_all_experts_with_one_scale_and_keeps_routing(moe_dir):
    samples = _samples()
    ref_model = _load(moe_dir)
    model = _load(moe_dir)
    logits = {}

    def keep(key):
        def hook(mod, args, out):
            logits[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    result = quantize_hf_model(model, make_recipe("w4a16-awq", 32), samples, ignore=NO_ATTENTION, progress=False)
    note = result.notes["model.layers.0.mlp"]
    assert note.startswith("smoothing") and "post_attention_layernorm" in note
    norm_ref = ref_model.model.layers[0].post_attention_layernorm.weight
    assert not torch.allclose(model.model.layers[0].post_attention_layernorm.weight, norm_ref)  # a scale was folded
    ids = _samples(2, 12, seed=1)
    for key, m in (("ref", ref_model), ("awq", model)):
        h = m.model.layers[0].mlp.gate.register_forward_hook(keep(key))
        with torch.no_grad():
            m(input_ids=ids)
        h.remove()
    torch.testing.assert_close(logits["awq"], logits["ref"], rtol=1e-4, atol=1e-4)  # router saw x/s with W*s
    awq = [r for r in result.reports if ".experts." in r.name and r.rtn_error is not None]
    assert awq and sum(r.error for r in awq) < sum(r.rtn_error for r in awq)


def _dequantized_dir(out: str, dst: str, ref_dir: str) -> None:
    """The checkpoint lowbit wrote, read back by lowbit's reader and dequantized, as a plain fp32 checkpoint
    with per-expert names (transformers fuses them on load)."""
    from safetensors.torch import save_file

    from lowbit.config import load_config
    from lowbit.formats.base import detect_format, read_canonical
    from tests.formats.test_compressed_tensors import dequant

    modules, plain = read_canonical(out, detect_format(out, load_config(out)))
    state = {k: v.float() for k, v in plain.items()}
    for name, mod in modules.items():
        k = (mod.tensors["qweight"].shape[1] * 8 if mod.scheme.is_int else mod.tensors["weight"].shape[1])
        state[f"{name}.weight"] = dequant(mod, k).float()
        if "bias" in mod.tensors:
            state[f"{name}.bias"] = mod.tensors["bias"].float()
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(ref_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("scheme,fmt", [("w4a16-gptq", "compressed-tensors"), ("w4a16-awq", "compressed-tensors"),
                                        ("w4a8-rtn", "compressed-tensors"), ("w4a8-awq", "compressed-tensors"),
                                        ("fp8", "compressed-tensors"), ("fp8-block", "fp8-block")])
def test_moe_checkpoint_loads_in_transformers_with_the_quantized_logits(moe_dir, scheme, fmt, tmp_path):
    from lowbit.quant.save import save_result

    model = _load(moe_dir)
    result = quantize_hf_model(model, make_recipe(scheme, 32 if scheme.startswith("w4a16") else None),
                               _samples(), progress=False)
    if scheme == "w4a8-rtn":  # experts only: attention and the shared expert stay 16-bit
        assert result.modules and all(".experts." in n for n in result.modules)
        scales = [m.tensors["input_scale"] for n, m in result.modules.items()]
        assert len(scales) == LAYERS * NUM_EXPERTS * 3 and all(float(s) > 0 for s in scales)
    out = str(tmp_path / "q")
    save_result(result, moe_dir, out, fmt, progress=False)
    _dequantized_dir(out, str(tmp_path / "dq"), moe_dir)
    back = _load(str(tmp_path / "dq"))
    ids = _samples(2, 12, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_w4a8_experts_export_to_modelopt(tmp_path, tiny_tokenizer_dir):
    """ModelOpt W4A8_AWQ needs K % 128 == 0: a Qwen3-MoE with 128-wide experts, int4 experts, the rest 16-bit."""
    from lowbit.quant.save import save_result

    src = str(tmp_path / "src")
    make_hf_model("qwen3_moe", src, tokenizer_dir=tiny_tokenizer_dir, num_hidden_layers=1, hidden_size=128,
                  moe_intermediate_size=128, head_dim=32)
    model = _load(src)
    result = quantize_hf_model(model, make_recipe("w4a8-rtn", None), _samples(), progress=False)
    save_result(result, src, str(tmp_path / "q"), "modelopt", progress=False)
    _dequantized_dir(str(tmp_path / "q"), str(tmp_path / "dq"), src)
    ids = _samples(2, 12, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(_load(str(tmp_path / "dq"))(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_quantize_api_on_a_moe_model_reports_routed_tokens(moe_dir, calib_file, tmp_path, capsys):
    from lowbit.quant import quantize

    report = quantize(moe_dir, "w4a16-gptq", str(tmp_path / "q"), calib=calib_file, num_samples=4, seq_len=32,
                      group_size=32, progress=False)
    experts = [layer for layer in report["layers"] if ".experts." in layer["name"]]
    assert len(experts) == LAYERS * NUM_EXPERTS * 3
    assert sum(layer["tokens"] for layer in experts if layer["name"].endswith("gate_proj")) == LAYERS * 4 * 32 * 2
    assert "MoE expert linears: 48" in capsys.readouterr().out
