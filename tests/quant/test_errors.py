"""User errors name the bad value and the supported set, and come before any calibration work."""

from __future__ import annotations

import pytest

from lowbit.quant import quantize
from lowbit.quant.recipes import check_format, make_recipe


def test_unknown_scheme_and_format():
    with pytest.raises(ValueError, match="scheme 'w3a16'.*supported: w4a16-rtn"):
        make_recipe("w3a16")
    with pytest.raises(ValueError, match="format 'gguf'.*supported: compressed-tensors"):
        check_format(make_recipe("w4a16-rtn"), "gguf")
    with pytest.raises(ValueError, match="cannot store scheme 'fp8-dynamic'"):
        check_format(make_recipe("fp8-dynamic"), "gptq")
    with pytest.raises(ValueError, match="zero points"):
        check_format(make_recipe("w4a16-awq", symmetric=True), "awq")
    with pytest.raises(ValueError, match="group 128"):
        make_recipe("w4a8-awq", group_size=64)


def test_group_size_must_divide_k(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"group size 48 does not divide in-features K=\[128, 256\].*--group-size 128"):
        quantize(tiny_model_dir, "w4a16-rtn", str(tmp_path / "q"), group_size=48, progress=False, verbose=False)
    assert not (tmp_path / "q").exists()


def test_output_directory_with_weights_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="source model directory|already holds"):
        quantize(tiny_model_dir, "fp8-dynamic", tiny_model_dir, progress=False, verbose=False)


def test_default_group_shrinks_to_fit_k():
    from lowbit.quant.recipes import fit_group

    r = make_recipe("w4a16-gptq")
    assert fit_group(r, {"a": (8, 256)}) is r
    assert fit_group(r, {"a": (8, 576), "b": (8, 1536)}).scheme.group_size == 64  # SmolLM2
    assert fit_group(make_recipe("w4a8-awq"), {"a": (8, 576)}).scheme.group_size == 128  # fixed by the scheme
