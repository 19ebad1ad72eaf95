"""config.json / generation_config.json parsing into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lowbit.config import load_config, parse_config

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512}


def cfg(**kw):
    raw = dict(BASE)
    raw.update(kw)
    return parse_config(raw)


def test_defaults_and_derived_sizes():
    c = cfg()
    assert c.head_dim == 16 and c.num_key_value_heads == 4 and c.q_size == 64 and c.kv_size == 64
    assert c.rope.type == "default" and c.rope.theta == 10000.0 and c.rope.rotary_dim == 16
    assert not c.attention_bias and not c.qk_norm and c.moe is None and c.mla is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 1


def test_qwen_flags():
    q2 = cfg(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    assert q2.attention_bias and not q2.o_bias and not q2.qk_norm
    q3 = cfg(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32)
    assert q3.qk_norm and not q3.attention_bias and q3.head_dim == 32 and q3.q_size == 128


def test_rope_old_style_rope_scaling_and_new_style_rope_parameters():
    old = cfg(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    new = cfg(rope_parameters={"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0})
    assert old.rope == new.rope and old.rope.factor == 2.0 and old.rope.theta == 500000.0
    l3 = cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192})
    assert l3.rope.type == "llama3" and l3.rope.original_max_position_embeddings == 8192
    yarn = cfg(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    assert yarn.rope.type == "yarn" and yarn.rope.factor == 40 and yarn.rope.mscale_all_dim == 1.0


def test_rope_errors_name_the_problem():
    with pytest.raises(NotImplementedError, match="longrope"):
        cfg(rope_scaling={"type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown rope type 'weird'"):
        cfg(rope_scaling={"type": "weird", "factor": 2.0})
    with pytest.raises(ValueError, match="needs `factor`"):
        cfg(rope_scaling={"type": "linear"})


def test_moe_and_mla_fields_are_reserved():
    qm = cfg(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0])
    assert qm.moe.num_experts == 8 and qm.moe.top_k == 2 and qm.moe.mlp_only_layers == (0,) and qm.qk_norm
    ds = cfg(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", n_routed_experts=16,
             num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
             scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, routed_scaling_factor=2.5,
             q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    assert ds.moe.n_shared_experts == 1 and ds.moe.topk_method == "noaux_tc" and ds.moe.routed_scaling_factor == 2.5
    assert ds.mla.kv_lora_rank == 32 and ds.mla.q_lora_rank is None


def test_sliding_window_layers():
    c = cfg(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert c.sliding_windows == (None, 8)
    off = cfg(model_type="qwen2", use_sliding_window=False, sliding_window=8)
    assert off.sliding_windows == (None, None)
    typed = cfg(layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    assert typed.sliding_windows == (16, None)


def test_generation_config_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, eos_token_id=[5, 6])))
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    c = load_config(str(tmp_path))
    assert c.generation.eos_token_ids == (5, 6) and c.generation.do_sample and c.generation.temperature == 0.6
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="architectures"):
        parse_config({k: v for k, v in BASE.items() if k != "architectures"})
