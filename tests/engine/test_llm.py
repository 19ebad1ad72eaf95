"""The LLM API end to end on a tiny random model: batching, preemption, stopping, sampling, chat."""

from __future__ import annotations

import pytest
import torch

from lowbit import LLM, SamplingParams
from lowbit.engine.detokenizer import IncrementalDetokenizer, find_stop
from lowbit.engine.sequence import Sequence
from tests.helpers import make_hf_model

PROMPTS = ["The quick brown fox", "Paris is the capital of", "Permission is hereby granted, free of charge, to any"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("tiny-llama")
    hf = make_hf_model("llama", str(d), tokenizer_dir=tiny_tokenizer_dir)
    return str(d), hf


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[0], device="cpu", block_size=4)


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_batched_greedy_matches_transformers(tiny, llm):
    _, hf = tiny
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt == prompt and out.finish_reason == "length" and len(out.token_ids) == 12
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, 12)
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_preemption_under_a_tiny_cache_gives_the_same_tokens(tiny, llm):
    # 16 blocks of 4 tokens (2 KiB each here) cannot hold all three sequences at once: the scheduler preempts
    small = LLM(tiny[0], device="cpu", block_size=4, kv_cache_memory_gb=16 * 2048 / 2**30)
    assert small.scheduler.blocks.num_blocks == 16
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert [o.token_ids for o in small.generate(PROMPTS, params)] == want
    assert small.scheduler.num_preemptions > 0 and small.scheduler.blocks.num_free == 16


def test_stop_conditions(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    text, ids = base.text, base.token_ids
    # a stop string taken from the middle of the greedy output cuts the text right before it
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == text[: text.find(stop)]
    kept = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True))[0]
    assert kept.text == text[: text.find(stop) + len(stop)]
    # a stop token ends generation after that token
    tok = ids[5]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tok]))[0]
    assert out.token_ids == ids[: ids.index(tok) + 1] and out.finish_reason == "stop" and out.stop_reason == tok
    # min_tokens suppresses that stop token until enough tokens exist
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tok],
                                                  min_tokens=ids.index(tok) + 2))[0]
    assert tok not in out.token_ids[: ids.index(tok) + 2]
    assert len(llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_eos_stops_unless_ignored(llm):
    eos = llm.tokenizer.eos_token_id
    assert eos in llm.eos_ids
    params = SamplingParams(temperature=0, max_tokens=40)
    prompt = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate([prompt], params)[0]
    if eos in out.token_ids:  # the random model may or may not emit EOS; when it does, it must stop there
        assert out.token_ids[-1] == eos and out.finish_reason == "stop"
    else:
        assert out.finish_reason == "length"


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, ignore_eos=True, seed=123)
    a = llm.generate(PROMPTS, [p] * 3)
    b = llm.generate(PROMPTS[::-1], [p] * 3)[::-1]  # other batch order, same per-request seeds
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=124))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_stream_and_chat(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    streamed = "".join(llm.stream(PROMPTS[2], params))
    assert streamed == llm.generate(PROMPTS[2], params)[0].text
    ids = llm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert llm.tokenizer.decode(ids).startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    out = llm.chat([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "Paris"}]], params)
    assert len(out) == 2 and all(len(o.token_ids) == 10 for o in out)


def test_bad_requests(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 300])
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(PROMPTS, [SamplingParams()] * 2)


def test_incremental_detokenizer_handles_split_characters(llm):
    tok = llm.tokenizer
    text = "caf\u00e9 \u65e5\u672c\u8a9e na\u00efve"
    ids = tok.encode(text)
    seq = Sequence(tok.encode("The"), SamplingParams())
    detok = IncrementalDetokenizer(tok, seq)
    pieces = []
    for t in ids:
        seq.output_token_ids.append(t)
        pieces.append(detok.step(seq))
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_find_stop_only_looks_at_new_text():
    assert find_stop("abc STOP def", 4, ["STOP"]) is None
    assert find_stop("abc STO", 3, ["STOP"]) is None
    assert find_stop("abc STOP", 1, ["STOP", "c S"]) == (4, "STOP")
