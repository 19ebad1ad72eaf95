"""Model configuration, parsed once from a Hugging Face model directory into frozen dataclasses.

Everything downstream (layers, models, engine) takes these objects by constructor and never reads
config.json again. `quantization_config` is kept raw here; `lowbit.formats` turns it into schemes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    type: str = "default"
    theta: float = 10000.0
    rotary_dim: int = 0  # head_dim * partial_rotary_factor
    max_position_embeddings: int = 2048
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MoEConfig:
    """Reserved for Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 (their model files come with the MoE issue)."""

    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE (one shared expert with a sigmoid gate)
    n_shared_experts: int = 0  # DeepSeek (plain shared experts)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    first_k_dense_replace: int = 0
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "noaux_tc" (grouped, score-correction bias)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class MLAConfig:
    """Reserved for DeepSeek-V2/V3 and Kimi-K2 multi-head latent attention."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class GenerationDefaults:
    """What generation_config.json asks for; SamplingParams fall back to these."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 sets it; o_proj follows `o_bias`)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    hidden_act: str = "silu"
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    torch_dtype: str | None = None
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    quantization: dict[str, Any] | None = None  # raw `quantization_config`, for lowbit.formats
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def _parse_rope(raw: dict[str, Any], head_dim: int, max_pos: int) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x writes `rope_theta` + `rope_scaling`
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype == "su" or rtype == "longrope":
        raise NotImplementedError(f"rope type {rtype!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unknown rope type {rtype!r}; supported: {SUPPORTED_ROPE_TYPES}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    orig = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    if rtype in ("llama3", "yarn") and orig is None:
        orig = max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig if (rtype == "yarn" and orig) else 1.0
    if rtype in ("linear", "dynamic", "llama3") and "factor" not in params:
        raise ValueError(f"rope type {rtype!r} needs `factor` in rope_scaling/rope_parameters")
    return RopeConfig(
        type=rtype,
        theta=theta,
        rotary_dim=int(head_dim * partial),
        max_position_embeddings=max_pos,
        factor=float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig is not None else None,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _parse_moe(raw: dict[str, Any]) -> MoEConfig | None:
    n = raw.get("num_experts", raw.get("n_routed_experts"))
    if not n:
        return None
    return MoEConfig(
        num_experts=int(n),
        top_k=int(raw.get("num_experts_per_tok", 1)),
        moe_intermediate_size=int(raw.get("moe_intermediate_size", raw.get("intermediate_size"))),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size", 0) or 0),
        n_shared_experts=int(raw.get("n_shared_experts", 0) or 0),
        decoder_sparse_step=int(raw.get("decoder_sparse_step", 1) or 1),
        mlp_only_layers=tuple(raw.get("mlp_only_layers", ()) or ()),
        first_k_dense_replace=int(raw.get("first_k_dense_replace", 0) or 0),
        scoring_func=raw.get("scoring_func", "softmax"),
        topk_method=raw.get("topk_method", "greedy"),
        n_group=int(raw.get("n_group", 1) or 1),
        topk_group=int(raw.get("topk_group", 1) or 1),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0) or 1.0),
    )


def _parse_mla(raw: dict[str, Any]) -> MLAConfig | None:
    if "kv_lora_rank" not in raw:
        return None
    return MLAConfig(
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
        qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
        v_head_dim=int(raw["v_head_dim"]),
    )


def _sliding_windows(raw: dict[str, Any], n_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if "use_sliding_window" in raw and not raw["use_sliding_window"]:
        window = None
    layer_types = raw.get("layer_types")
    if layer_types is None:
        # Qwen2 convention: layers >= max_window_layers use the window when it is enabled
        first = raw.get("max_window_layers", 0) if "max_window_layers" in raw else 0
        layer_types = [
            "sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(n_layers)
        ]
    return tuple(window if t == "sliding_attention" and window else None for t in layer_types)


def _as_tuple(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (int(x),)


def parse_generation_config(raw: dict[str, Any], model_raw: dict[str, Any]) -> GenerationDefaults:
    eos = _as_tuple(raw.get("eos_token_id", model_raw.get("eos_token_id")))
    return GenerationDefaults(
        eos_token_ids=eos,
        bos_token_id=raw.get("bos_token_id", model_raw.get("bos_token_id")),
        do_sample=bool(raw.get("do_sample", False)),
        temperature=raw.get("temperature"),
        top_p=raw.get("top_p"),
        top_k=raw.get("top_k"),
        repetition_penalty=raw.get("repetition_penalty"),
        max_new_tokens=raw.get("max_new_tokens"),
    )


def parse_config(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    archs = raw.get("architectures") or []
    if not archs:
        raise ValueError("config.json has no `architectures` entry; cannot tell which model to build")
    n_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // n_heads)
    n_layers = int(raw["num_hidden_layers"])
    max_pos = int(raw.get("max_position_embeddings", 2048))
    model_type = raw.get("model_type", "")
    qkv_bias = bool(raw.get("attention_bias", False)) or model_type in ("qwen2", "qwen2_moe")
    return ModelConfig(
        architecture=archs[0],
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw.get("intermediate_size", 0)),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        rope=_parse_rope(raw, head_dim, max_pos),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        hidden_act=raw.get("hidden_act", "silu"),
        sliding_windows=_sliding_windows(raw, n_layers),
        torch_dtype=raw.get("torch_dtype", raw.get("dtype")),
        moe=_parse_moe(raw),
        mla=_parse_mla(raw),
        quantization=raw.get("quantization_config"),
        generation=parse_generation_config(generation or {}, raw),
    )


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_config(model_dir: str) -> ModelConfig:
    raw = _read_json(os.path.join(model_dir, "config.json"))
    if raw is None:
        raise FileNotFoundError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    return parse_config(raw, _read_json(os.path.join(model_dir, "generation_config.json")))
