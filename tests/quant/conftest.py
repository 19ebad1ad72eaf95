"""Tiny random models shared by the quantization tests (built once per session)."""

from __future__ import annotations

import pytest

from tests.helpers import make_hf_model

# K = 128 and 256: divisible by group 128 (W4A8, ModelOpt) and by fp8 blocks, so transformers loads every scheme
QUANT_TINY = dict(hidden_size=128, intermediate_size=256)
CALIB_TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software. "
              "The quick brown fox jumps over the lazy dog. Paris is the capital of France. ") * 40


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    out = str(tmp_path_factory.mktemp("tiny-llama"))
    make_hf_model("llama", out, tokenizer_dir=tiny_tokenizer_dir, **QUANT_TINY)
    return out


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return str(path)
