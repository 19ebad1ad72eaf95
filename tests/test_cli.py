"""The command line: `lowbit run` on a tiny model and on the embedded SmolLM2 (the README's demo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lowbit(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_run_on_a_local_model_directory(tmp_path, tiny_tokenizer_dir):
    make_hf_model("qwen3", str(tmp_path), tokenizer_dir=tiny_tokenizer_dir)
    out = lowbit("run", "-m", str(tmp_path), "-p", "Paris is", "-p", "The fox", "--max-tokens", "5", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "### Paris is" in out.stdout and "### The fox" in out.stdout


def test_errors_are_one_line_messages(tmp_path):
    out = lowbit("run", "-m", str(tmp_path / "missing"), "-p", "x")
    assert out.returncode == 2 and "lowbit: error:" in out.stderr and "Traceback" not in out.stderr
    out = lowbit("run", "-m", str(tmp_path), "-p", "x", "--device", "cpu")  # a directory without config.json
    assert out.returncode == 2 and "no config.json" in out.stderr


@pytest.mark.slow
def test_default_model_answers_the_capital_of_france():
    out = lowbit("run", "-p", "What is the capital of France?", "--max-tokens", "30", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, out.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_default_model_on_the_gpu():
    out = lowbit("run", "-p", "What is the capital of France?", "--max-tokens", "30", "--device", "cuda")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, out.stdout
