"""Calibration sources (file, folder, JSONL, dataset name offline) and deterministic sampling."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.quant.calibration import (CALIB_LICENSES, EVAL_LICENSES, calibration_samples, load_texts,
                                      tokenize_texts)


def test_text_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    (tmp_path / ".hidden").write_text("never")
    assert load_texts(str(tmp_path / "a.txt")) == ["alpha text"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["beta", "gamma"]
    assert load_texts(str(tmp_path)) == ["alpha text", "beta", "gamma"]


def test_bad_sources_are_value_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text'"):
        load_texts(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        load_texts(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such file"):
        load_texts(str(tmp_path / "missing.txt"))  # a path: never looked up on the hub


def test_samples_are_deterministic_windows(tiny_tokenizer_dir, calib_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = load_texts(calib_file)
    a = calibration_samples(tok, texts, 6, 32, seed=3)
    b = calibration_samples(tok, texts, 6, 32, seed=3)
    c = calibration_samples(tok, texts, 6, 32, seed=4)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenize_texts(tok, texts).tolist()
    row = a[0].tolist()
    assert any(stream[i:i + 32] == row for i in range(len(stream) - 31))  # a real window of the text
    with pytest.raises(ValueError, match="fewer than one sample"):
        calibration_samples(tok, ["tiny"], 2, 4096)
    with pytest.raises(ValueError, match="positive"):
        calibration_samples(tok, texts, 0, 32)


def test_default_eval_text_is_held_out():
    assert not set(CALIB_LICENSES) & set(EVAL_LICENSES)
