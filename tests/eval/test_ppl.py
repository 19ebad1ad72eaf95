"""Sliding-window perplexity: every token after the first scored once; lowbit's model agrees with HF's."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.eval.ppl import hf_logits_fn, lowbit_logits_fn, perplexity
from lowbit.models.loader import load_model
from tests.helpers import make_hf_model


def _full_nll(logits_fn, ids):
    logp = torch.log_softmax(logits_fn(ids)[:-1], -1)
    return float(-logp.gather(1, ids[1:, None]).mean())


def test_windows_score_each_token_once_and_match_hf(tiny_tokenizer_dir, tmp_path):
    hf = make_hf_model("llama", str(tmp_path), tokenizer_dir=tiny_tokenizer_dir)
    ours = lowbit_logits_fn(load_model(str(tmp_path), torch.device("cpu"), torch.float32, None)[0], "cpu")
    ref = hf_logits_fn(hf)
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(0))
    whole = perplexity(ours, ids, context_len=256)
    assert whole.tokens == 149 and whole.nll == pytest.approx(_full_nll(ref, ids), rel=1e-4)
    for ctx, stride in ((64, 32), (64, 64), (50, 7)):
        a, b = perplexity(ours, ids, ctx, stride), perplexity(ref, ids, ctx, stride)
        assert a.tokens == 149 and a.ppl == pytest.approx(b.ppl, rel=1e-4)
        assert math.exp(a.nll) == pytest.approx(a.ppl)
    with pytest.raises(ValueError, match="stride"):
        perplexity(ours, ids, 64, 128)
