"""compressed-tensors checkpoints made by the real producer: llm-compressor `oneshot` on tiny random HF models
(tests/helpers.make_hf_model), saved with `save_compressed=True`, on the CPU.

Model sizes keep every group size (128) dividing K and give the FP8 block grid partial edges (Llama k/v_proj
have N = 64 < 128). The one layout this llm-compressor release cannot write any more — actorder "group" with
`weight_g_idx` (removed in compressed-tensors 0.19) — is built by hand with compressed-tensors' own packer,
as older llm-compressor releases wrote it.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from tests.helpers import VOCAB, make_hf_model

SIZES = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4)
BASES = {  # name -> (arch, overrides): bias on q/k/v (Qwen2), q/k norms + tied embeddings (Qwen3)
    "llama": ("llama", dict(SIZES, num_key_value_heads=1)),
    "qwen2": ("qwen2", dict(SIZES, num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(SIZES, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)),
}
NOT_LM_HEAD = ["lm_head"]


def _custom_groups() -> dict:
    """Per-group targets: q/k/v int4 asymmetric per channel, the MLP int8 per channel; o_proj untargeted."""
    return {
        "attn": {"targets": [r"re:.*self_attn\.(q|k|v)_proj$"],
                 "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}},
        "mlp": {"targets": [r"re:.*mlp\..*_proj$"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}},
    }


# case -> (base, recipe kind, scheme or config groups, extra): what llm-compressor is asked for
CASES = {
    "w4a16": ("llama", "preset", "W4A16", {}),
    "w4a16_asym": ("llama", "preset", "W4A16_ASYM", {}),
    "w8a16_qwen2": ("qwen2", "preset", "W8A16", {}),
    "int_groups": ("llama", "groups", _custom_groups(), {"ignore": ["lm_head", "model.layers.1.mlp.down_proj"]}),
    "fp8_static": ("llama", "preset", "FP8", {"calibrate": True}),
    "fp8_dynamic_qwen3": ("qwen3", "preset", "FP8_DYNAMIC", {}),
    "fp8_block": ("llama", "preset", "FP8_BLOCK", {}),
    "w4afp8_int": ("llama", "preset", "W4AFP8", {}),  # inferred format: int-quantized (int8 [N, K] weights)
    "w4afp8_pack_qwen2": ("qwen2", "preset", "W4AFP8", {"format": "pack-quantized"}),  # as vLLM wants it
    "gptq": ("llama", "gptq", "W4A16", {"calibrate": True}),  # slow: ~20 s on 2 cores
}


def make_base(root: str, name: str, tokenizer_dir: str) -> str:
    path = os.path.join(root, f"base_{name}")
    if not os.path.exists(path):
        arch, overrides = BASES[name]
        make_hf_model(arch, path, seed=len(name), tokenizer_dir=tokenizer_dir, **overrides)
    return path


def calibration_set(n: int = 4, length: int = 16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)]})


def produce(root: str, case: str, tokenizer_dir: str) -> str:
    """Run llm-compressor for `case` once; the compressed checkpoint directory."""
    out = os.path.join(root, case)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    base, kind, scheme, extra = CASES[case]
    base_dir = make_base(root, base, tokenizer_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ignore = extra.get("ignore", NOT_LM_HEAD)
    if kind == "preset":
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)
    elif kind == "groups":
        recipe = QuantizationModifier(config_groups=scheme, ignore=ignore)
    else:
        recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=ignore)
    kw = {}
    if extra.get("calibrate"):
        kw = dict(dataset=calibration_set(), num_calibration_samples=4, max_seq_length=16, pipeline="basic",
                  processor=transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    oneshot(model=model, recipe=recipe, **kw)
    # llm-compressor's save_pretrained wrapper: compress, write tensors, then the quantization_config
    model.save_pretrained(out, save_compressed=True, quantization_format=extra.get("format"))
    return out


def make_act_order_group(root: str, tokenizer_dir: str, group: int = 64) -> tuple[str, dict[str, torch.Tensor]]:
    """A W4A16 g64 checkpoint with actorder "group": the Llama base's Linears quantized by round-to-nearest in a
    permuted column order (groups of permuted columns, g_idx[k] = position(k) // G, as GPTQ act-order does),
    packed with compressed-tensors' pack_to_int32. Returns (dir, {prefix: dequantized weight [N, K] float32})."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from safetensors.torch import load_file, save_file

    out = os.path.join(root, "act_order_group")
    base = make_base(root, "llama", tokenizer_dir)
    state = load_file(os.path.join(base, "model.safetensors"))
    tensors, dequant = {}, {}
    for i, (name, w) in enumerate(sorted(state.items())):
        prefix = name[: -len(".weight")]
        if ".layers." not in name or not name.endswith("_proj.weight"):
            tensors[name] = w
            continue
        n, k = w.shape
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(i))
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).int()
        absmax = torch.stack([w[:, g_idx == j].abs().amax(1) for j in range(k // group)], 1)  # [N, K/G]
        scale = absmax / 7.5  # compressed-tensors symmetric int4: range [-8, 7], scale = absmax / (15 / 2)
        q = torch.clamp(torch.round(w / scale[:, g_idx.long()]), -8, 7).to(torch.int8)
        tensors[f"{prefix}.weight_packed"] = pack_to_int32(q, 4)
        tensors[f"{prefix}.weight_scale"] = scale
        tensors[f"{prefix}.weight_shape"] = torch.tensor([n, k])
        tensors[f"{prefix}.weight_g_idx"] = g_idx
        unpacked = unpack_from_int32(tensors[f"{prefix}.weight_packed"], 4, torch.Size([n, k]))
        dequant[prefix] = unpacked.float() * scale[:, g_idx.long()]
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(base, "config.json")))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": "group", "block_structure": None, "observer": "minmax"}
    cfg["quantization_config"] = {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "format": "pack-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "version": "0.10.2"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out, dequant


def edited_copy(src: str, dst: str, config_edit=None, tensor_edit=None) -> str:
    """Copy a checkpoint, then edit its quantization_config (dict in place) and/or its tensors (dict in place)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config_edit:
        path = os.path.join(dst, "config.json")
        cfg = json.load(open(path))
        config_edit(cfg["quantization_config"])
        with open(path, "w") as f:
            json.dump(cfg, f)
    if tensor_edit:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        tensor_edit(tensors)
        tensors = {k: v.contiguous() for k, v in tensors.items()}  # edits may slice
        save_file(tensors, path, metadata={"format": "pt"})
    return dst
