"""Llama, Qwen2 and Qwen3 (dense) in one decoder, selected by config flags.

  Qwen2: bias on q/k/v.   Qwen3: RMSNorm over head_dim on q and k before rotary.
  Tied embeddings (SmolLM2, small Qwen): the LM head reuses embed_tokens.weight.

Checkpoint names -> modules: q/k/v_proj -> qkv_proj shards 0/1/2, gate/up_proj -> gate_up_proj 0/1.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.layers.activation import GatedAct, act_linear
from lowbit.layers.attention import Attention, AttentionMetadata
from lowbit.layers.embedding import VocabEmbedding
from lowbit.layers.linear import Linear
from lowbit.layers.norm import RMSNorm, norm_linear
from lowbit.layers.quant_config import QuantConfig
from lowbit.layers.rotary import RotaryEmbedding, apply_rotary


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: QuantConfig, dtype: torch.dtype, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size], bias=cfg.attention_bias, dtype=dtype,
            quant_method=quant.linear_method(f"{prefix}.qkv_proj", [f"{prefix}.{n}" for n in ("q_proj", "k_proj", "v_proj")]),
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = Linear(
            cfg.q_size, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype,
            quant_method=quant.linear_method(f"{prefix}.o_proj", [f"{prefix}.o_proj"]), prefix=f"{prefix}.o_proj",
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5, layer_idx, window)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(self.qkv_proj(x), cos_sin, meta)

    def attend(self, qkv: torch.Tensor, cos_sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Everything after qkv_proj (the decoder layer runs qkv_proj fused with its input norm)."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, cos_sin)
        o = self.attn(q, k, v, meta)
        return self.o_proj(o.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig, dtype: torch.dtype, prefix: str,
                 intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = Linear(
            cfg.hidden_size, [inter, inter], bias=cfg.mlp_bias, dtype=dtype,
            quant_method=quant.linear_method(f"{prefix}.gate_up_proj", [f"{prefix}.gate_proj", f"{prefix}.up_proj"]),
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = Linear(
            inter, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype,
            quant_method=quant.linear_method(f"{prefix}.down_proj", [f"{prefix}.down_proj"]), prefix=f"{prefix}.down_proj",
        )
        self.act = GatedAct(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """down_proj(act(gate) * up) from gate_up_proj's output h [T, 2I] (SiLU-and-mul fused into down_proj's input
        quantization where its backend offers that: layers/activation.act_linear)."""
        return act_linear(self.act, self.down_proj, h)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: QuantConfig, dtype: torch.dtype, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(cfg, layer_idx, quant, dtype, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(cfg, quant, dtype, f"{prefix}.mlp")

    def forward(self, x, residual, cos_sin, meta):
        # each norm runs with the projection after it (norm_linear: fused into its fp8 input quantization where the
        # backend offers that)
        qkv, residual = norm_linear(self.input_layernorm, self.self_attn.qkv_proj, x, residual)
        x = self.self_attn.attend(qkv, cos_sin, meta)
        h, residual = norm_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, x, residual)
        return self.mlp.down(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig, dtype: torch.dtype, prefix: str = "model"):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, quant, dtype, f"{prefix}.layers.{i}") for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb(positions, meta.token_seq_lens)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (module in this model, output shard)
    packed_modules = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors that carry nothing this model needs
    ignored_checkpoint_keys = (r"rotary_emb\.inv_freq$",)

    def __init__(self, cfg: ModelConfig, quant: QuantConfig, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, quant, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, prefix="lm_head",
                                  quant_method=quant.linear_method("lm_head", ["lm_head"]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return hidden @ self.model.embed_tokens.weight.t()
        return self.lm_head(hidden)
