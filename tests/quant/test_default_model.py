"""The demo default: `resolve_model(None)` is SmolLM2 quantized once to w4a16 (the slow end-to-end check,
"Paris", is tests/test_cli.py::test_default_model_answers_the_capital_of_france)."""

from __future__ import annotations

import pytest

from lowbit import hub


def test_bad_default_quant_setting_is_a_value_error(monkeypatch):
    monkeypatch.setenv("LOWBIT_DEFAULT_QUANT", "awq4")
    with pytest.raises(ValueError, match="LOWBIT_DEFAULT_QUANT='awq4'.*supported: \\('rtn', 'gptq', 'bf16'\\)"):
        hub.resolve_model(None)


def test_bf16_setting_and_explicit_name_give_the_unquantized_model(monkeypatch):
    monkeypatch.setattr(hub, "default_model_dir", lambda: "/cache/SmolLM2-bf16")
    monkeypatch.setenv("LOWBIT_DEFAULT_QUANT", "bf16")
    assert hub.resolve_model(None) == "/cache/SmolLM2-bf16"
    monkeypatch.delenv("LOWBIT_DEFAULT_QUANT")
    assert hub.resolve_model(hub.DEFAULT_MODEL) == "/cache/SmolLM2-bf16"


def test_quantized_default_is_made_once(monkeypatch, tmp_path):
    import lowbit.quant.api as api

    calls = []

    def fake_quantize(src, scheme, out, **kw):
        calls.append((src, scheme, kw["group_size"]))
        open(f"{out}/config.json", "w").write("{}")

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "default_model_dir", lambda: "/cache/SmolLM2-bf16")
    monkeypatch.setattr(api, "quantize", fake_quantize)
    first = hub.resolve_model(None)
    assert first.endswith("SmolLM2-135M-Instruct-w4a16-rtn-g64") and hub.resolve_model("default") == first
    assert calls == [("/cache/SmolLM2-bf16", "w4a16-rtn", 64)]
