"""lowbit's dense decoder against transformers on tiny random configs of every dense family.

Three prompts of different lengths are prefilled in one batch, then decoded together for several
steps through the paged KV cache (block size 4, so contexts cross block boundaries); every step's
logits must match transformers run one sequence at a time with its own KV cache.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch

from tests.helpers import VOCAB, Stepper, hf_incremental_logits, make_hf_model

CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-mha-headdim": ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 32}}),
    "linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "dynamic-rope": ("llama", {"max_position_embeddings": 16,
                               "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
    "yarn-rope": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 64}}),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
}

PROMPT_LENS = (5, 11, 17)
DECODE_STEPS = 7


def _compare(case: str, tmp_path, device: str, dtype: torch.dtype, atol: float | None, bf16_budget: bool = False):
    """atol: lowbit vs transformers in the same dtype. bf16_budget: both run in bf16 and are measured against
    transformers in fp32 on the same (bf16-rounded) weights; lowbit's error may be at most twice
    transformers' own bf16 error (floor 1%): the two round in different places (fused q/k/v and gate/up
    GEMMs, attention kernels), so neither is closer to the other than to the truth."""
    arch, overrides = CASES[case]
    hf = make_hf_model(arch, str(tmp_path), seed=zlib.crc32(case.encode()) % 1000, dtype=dtype, **overrides)
    truth = hf.to(device=device, dtype=torch.float32) if bf16_budget else None
    hf = copy.deepcopy(hf).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    conts = [torch.randint(3, VOCAB, (DECODE_STEPS,), generator=gen).tolist() for _ in PROMPT_LENS]

    stepper = Stepper(str(tmp_path), device=device, dtype=dtype)
    seqs = [stepper.add(p) for p in prompts]
    got = {s.seq_id: [] for s in seqs}
    for step in range(DECODE_STEPS + 1):
        forced = {s.seq_id: c[step] for s, c in zip(seqs, conts) if step < DECODE_STEPS}
        for sid, row in stepper.step(forced).items():
            got[sid].append(row.float().cpu())
    for seq, prompt, cont in zip(seqs, prompts, conts):
        want = hf_incremental_logits(hf, prompt, cont, device=device)
        assert len(got[seq.seq_id]) == len(want)
        exact = hf_incremental_logits(truth, prompt, cont, device=device) if bf16_budget else want
        for i, (g, w, t) in enumerate(zip(got[seq.seq_id], want, exact)):
            what = f"{case}: prompt of {len(prompt)}, step {i}"
            if atol is not None:
                diff = (g - w).abs().max().item()
                assert diff < atol, f"{what}: max abs diff {diff:.3g}"
            if bf16_budget:
                ours, theirs = ((g - t).norm() / t.norm()).item(), ((w - t).norm() / t.norm()).item()
                assert ours < max(2 * theirs, 1e-2), f"{what}: bf16 error {ours:.3g} vs transformers' {theirs:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_fp32_cpu(case, tmp_path):
    _compare(case, tmp_path, "cpu", torch.float32, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_bf16_gpu(case, tmp_path):
    _compare(case, tmp_path, "cuda", torch.bfloat16, atol=None, bf16_budget=True)
