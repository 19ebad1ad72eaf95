"""Shared fixtures: tiny random Hugging Face models saved to disk, a tiny tokenizer, device marks."""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton kernels run on the CPU through the interpreter; it must be chosen before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tests.helpers import make_tokenizer

    return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # never write into the user's cache from tests, except the shared SmolLM2 conversion
    if "LOWBIT_CACHE" not in os.environ:
        monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.getbasetemp() / "lowbit-cache"))
