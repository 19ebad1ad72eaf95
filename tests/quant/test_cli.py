"""`lowbit quantize` and `lowbit eval ppl` as a user runs them."""

from __future__ import annotations

import json
import math

from tests.test_cli import lowbit


def test_quantize_then_eval_ppl(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "gptq"
    r = lowbit("quantize", tiny_model_dir, "--scheme", "w4a16-gptq", "--out", str(out), "--calib", calib_file,
               "--num-samples", "4", "--seq-len", "32", "--group-size", "32", "--ignore", "re:.*down_proj$",
               "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "output error" in r.stdout and "weights on disk" in r.stdout and "below RTN" in r.stdout
    report = json.load(open(out / "quantization_report.json"))
    assert "model.layers.0.mlp.down_proj" in report["ignored"] and report["summary"]["linears"] == 12
    r = lowbit("eval", "ppl", str(out), "--text", calib_file, "--context-len", "64", "--stride", "32",
               "--max-tokens", "200", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 199 and math.isfinite(res["ppl"]) and res["ppl"] > 1 and res["seconds"] >= 0


def test_bad_arguments_are_one_line_errors(tiny_model_dir, tmp_path):
    r = lowbit("quantize", tiny_model_dir, "--scheme", "w5a16", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "supported: w4a16-rtn" in r.stderr and "Traceback" not in r.stderr
    r = lowbit("quantize", tiny_model_dir, "--scheme", "w4a16-rtn", "--out", str(tmp_path / "x"), "--format", "gguf")
    assert r.returncode == 2 and "format 'gguf'" in r.stderr
