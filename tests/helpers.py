"""Test helpers: tiny random HF models on disk, a tiny BPE tokenizer, and a step-by-step driver
that runs lowbit's model through the real engine pieces (paged KV cache, scheduler, runner)."""

from __future__ import annotations

import os

import torch

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.model_runner import ModelRunner
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import Sequence
from lowbit.models.loader import load_model

VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software. "
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED. "
    "Numbers 0123456789 and punctuation: ;:,.!?()[]{} - caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e."
)


def make_tokenizer(out_dir: str) -> str:
    """A byte-level BPE tokenizer with VOCAB tokens and a ChatML template, trained on fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.15)


def hf_config(arch: str, **overrides):
    import transformers

    kw = dict(TINY)
    kw.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
           "deepseek_v3": transformers.DeepseekV3Config}[arch]
    if arch in ("qwen3", "qwen3_moe"):
        kw.setdefault("head_dim", 16)
    if arch.endswith("_moe"):  # 8 routed experts, top 2 (qwen2_moe: plus a shared expert with a sigmoid gate)
        for k, v in dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                         decoder_sparse_step=1, mlp_only_layers=[]).items():
            kw.setdefault(k, v)
        if arch == "qwen2_moe":
            kw.setdefault("shared_expert_intermediate_size", 64)
    if arch == "deepseek_v3":  # MLA attention, 8 routed experts top 2 + 1 shared expert, every layer MoE
        for k, v in dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                         first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16).items():
            kw.setdefault(k, v)
    return cls(**kw)


def make_hf_model(arch: str, out_dir: str, seed: int = 0, tokenizer_dir: str | None = None, dtype=torch.float32,
                  max_shard_size: str | None = None, **overrides):
    """Random-weight HF model saved as safetensors in out_dir; returns the HF model (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # spread the norms away from 1 so a missing norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out_dir, **kwargs)
    model.float()
    if tokenizer_dir:
        for f in os.listdir(tokenizer_dir):
            with open(os.path.join(tokenizer_dir, f), "rb") as src, open(os.path.join(out_dir, f), "wb") as dst:
                dst.write(src.read())
    return model


class Stepper:
    """Drives lowbit's model one engine step at a time and returns the logits of each step."""

    def __init__(self, model_dir: str, device="cpu", dtype=torch.float32, block_size: int = 4, num_blocks: int = 256):
        self.model, self.cfg = load_model(model_dir, torch.device(device), dtype)
        self.runner = ModelRunner(self.model, self.cfg, torch.device(device), dtype, block_size)
        self.runner.allocate_kv_cache(num_blocks)
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=64, max_num_batched_tokens=4096)

    def add(self, prompt_ids: list[int]) -> Sequence:
        seq = Sequence(prompt_ids, SamplingParams(temperature=0.0))
        self.scheduler.add(seq)
        return seq

    def step(self, forced: dict[int, int] | None = None) -> dict[int, torch.Tensor]:
        """One step; `forced[seq_id]` is the token appended after it (default: argmax). Logits by seq_id."""
        batch = self.scheduler.schedule()
        logits = self.runner.forward_logits(batch)
        out = {}
        for seq, n, row in zip(batch.seqs, batch.query_lens, logits):
            seq.num_computed_tokens += n
            tok = (forced or {}).get(seq.seq_id, int(row.argmax()))
            seq.output_token_ids.append(tok)
            out[seq.seq_id] = row
        return out


def hf_incremental_logits(hf_model, prompt: list[int], continuation: list[int], device="cpu") -> list[torch.Tensor]:
    """HF reference with its own KV cache: logits after the prompt, then after each continuation token."""
    import copy

    from transformers import DynamicCache

    hf_model = copy.deepcopy(hf_model)  # dynamic rope keeps per-model state; each sequence starts fresh
    cache = DynamicCache(config=hf_model.config)
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        out = hf_model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits = [out.logits[0, -1].float().cpu()]
        pos = len(prompt)
        for tok in continuation:
            out = hf_model(input_ids=torch.tensor([[tok]], device=device), past_key_values=out.past_key_values,
                           use_cache=True, position_ids=torch.tensor([[pos]], device=device))
            logits.append(out.logits[0, -1].float().cpu())
            pos += 1
    return logits
