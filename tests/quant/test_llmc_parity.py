"""lowbit's round-to-nearest writes the checkpoint llm-compressor writes for the same model and scheme (the
compressed-tensors rounding of the bf16 quotient w / scale, rtn.py), bit for bit."""

from __future__ import annotations

import os

import torch

from tests.helpers import make_hf_model


def _tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_rtn_matches_llm_compressor_bit_for_bit(tmp_path, tiny_tokenizer_dir):
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from lowbit.quant import quantize

    base = str(tmp_path / "base")
    make_hf_model("llama", base, seed=3, tokenizer_dir=tiny_tokenizer_dir, dtype=torch.bfloat16,
                  hidden_size=256, intermediate_size=384, num_attention_heads=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    model.save_pretrained(str(tmp_path / "llmc"), save_compressed=True)
    quantize(base, "w4a16-rtn", str(tmp_path / "lowbit"), group_size=128, progress=False, verbose=False)

    theirs, ours = _tensors(str(tmp_path / "llmc")), _tensors(str(tmp_path / "lowbit"))
    packed = [k for k in theirs if k.endswith(("weight_packed", "weight_scale"))]
    assert len(packed) == 2 * 7 * 2  # 2 layers x 7 linears x (packed, scale)
    for k in packed:
        assert theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]), k
