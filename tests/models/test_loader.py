"""Loading: sharded safetensors, tied embeddings, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.formats.base import FormatError
from lowbit.models.loader import CheckpointError, load_model
from tests.helpers import make_hf_model


def _rewrite(model_dir, edit):
    """Apply edit(tensors) to the single-file checkpoint in model_dir."""
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_with_index(tmp_path):
    hf = make_hf_model("llama", str(tmp_path), max_shard_size="50KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model, _ = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    ours = model.model.layers[1].self_attn.qkv_proj.weight
    ref = hf.model.layers[1].self_attn
    torch.testing.assert_close(ours, torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight]))
    torch.testing.assert_close(model.model.norm.weight, hf.model.norm.weight)


def test_tied_embeddings_ignore_a_stored_lm_head(tmp_path):
    make_hf_model("qwen2", str(tmp_path), tie_word_embeddings=True)
    _rewrite(str(tmp_path), lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model, cfg = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert cfg.tie_word_embeddings and model.lm_head is None


def test_missing_tensor_is_named(tmp_path):
    make_hf_model("llama", str(tmp_path))
    _rewrite(str(tmp_path), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*model\.layers\.1\.mlp\.gate_up_proj\.weight \(shard 1\)"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)


def test_unexpected_tensor_is_named(tmp_path):
    make_hf_model("llama", str(tmp_path))
    _rewrite(str(tmp_path), lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.0.mlp.extra_proj.weight"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)


def test_misshaped_tensor_is_named(tmp_path):
    make_hf_model("llama", str(tmp_path))
    _rewrite(str(tmp_path), lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(31, 64)))
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*shape \(31, 64\).*expects \(32, 64\)"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)


def test_missing_shard_file_and_unknown_architecture(tmp_path):
    make_hf_model("llama", str(tmp_path), max_shard_size="50KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    os.remove(tmp_path / shards[-1])
    with pytest.raises(FormatError, match="shards listed in model.safetensors.index.json are missing"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*supported"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)


def test_unknown_quantization_method(tmp_path):
    make_hf_model("llama", str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="bitsandbytes"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)
