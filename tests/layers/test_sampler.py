"""Sampler semantics: greedy, temperature, top-k/top-p/min-p filtering, repetition penalty, seeds."""

from __future__ import annotations

import torch

from lowbit.layers.sampler import SamplingTensors, Sampler, _top_k_top_p_min_p, apply_repetition_penalty


def tensors(b, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, seen=None, gens=None):
    return SamplingTensors(
        temperatures=torch.full((b,), float(temperature)), top_ks=torch.full((b,), top_k, dtype=torch.long),
        top_ps=torch.full((b,), float(top_p)), min_ps=torch.full((b,), float(min_p)),
        repetition_penalties=torch.full((b,), float(rep)), seen_tokens=seen, generators=gens or [None] * b,
        all_greedy=temperature == 0)


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(Sampler()(logits, tensors(4, temperature=0)), logits.argmax(-1))


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 30)
    seen = torch.tensor([[1, 5, 5, 7], [2, 3, -1, -1]])
    ours = apply_repetition_penalty(logits, seen, torch.tensor([1.3, 1.3]))
    hf_ids = torch.tensor([[1, 5, 5, 7], [2, 3, 3, 3]])
    want = RepetitionPenaltyLogitsProcessor(1.3)(hf_ids, logits.clone())
    torch.testing.assert_close(ours, want)


def test_filters_keep_the_right_sets():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda t: torch.isfinite(_top_k_top_p_min_p(logits, t)[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(tensors(1, top_k=2)) == [0, 1]
    assert kept(tensors(1, top_p=0.6)) == [0, 1]  # 0.5 < 0.6, so the second token is still needed
    assert kept(tensors(1, top_p=0.5)) == [0]
    assert kept(tensors(1, min_p=0.25)) == [0, 1, 2]  # >= 0.25 * 0.5
    assert kept(tensors(1, top_p=1e-9)) == [0]  # the most likely token always survives


def test_sampling_distribution_and_seeds():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(20000, 1)
    draws = Sampler()(logits, tensors(20000))
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015), freq
    hot = Sampler()(logits[:2000] / 0.25, tensors(2000))  # temperature sharpens: token 0 dominates
    assert (hot == 0).float().mean() > 0.9
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = Sampler()(logits[:64], tensors(64, gens=[g1] * 64))
    b = Sampler()(logits[:64], tensors(64, gens=[g2] * 64))
    assert torch.equal(a, b)


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = torch.randn(3, 40)
    t = tensors(3)
    t.temperatures = torch.tensor([0.0, 1.0, 0.0])
    out = Sampler()(logits, t)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
