"""`lowbit inspect` on a quantized checkpoint, `lowbit matrix` from the backend lists and bench/results,
and the selection error that lists why every backend declined."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lowbit import cli, matrix
from lowbit.formats.base import safetensors_files
from lowbit.layers import selection
from lowbit.layers.selection import LayerShape, select_backend
from lowbit.scheme import FP8_BLOCK, W4A16_G128, QuantScheme
from tests.helpers import make_hf_model
from tests.layers.test_reference_schemes import _quantize, _write


def _quantized_checkpoint(path, scheme: QuantScheme, writer: str = "ct") -> str:
    hf = make_hf_model("qwen2", str(path / "base"), hidden_size=256, intermediate_size=384, head_dim=64)
    gen = torch.Generator().manual_seed(0)
    modules, plain = _quantize(hf, scheme, torch.randint(3, 300, (1, 8), generator=gen), gen, writer)
    modules.pop("model.layers.1.mlp.down_proj")  # left in 16 bits (written to `ignore`)
    lin = hf.get_submodule("model.layers.1.mlp.down_proj")
    plain["model.layers.1.mlp.down_proj.weight"] = lin.weight.detach().clone()
    config = dict(hf.config.to_dict(), dtype="float32")
    _write(writer, str(path / "q"), config, modules, plain)
    return str(path / "q")


def test_inspect_names_format_schemes_ignored_and_sizes(tmp_path, capsys):
    path = _quantized_checkpoint(tmp_path, W4A16_G128)
    assert cli.main(["inspect", path, "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "Qwen2ForCausalLM"
    assert info["format"]["format"] == "compressed-tensors" and info["format"]["quantized_modules"] == 13
    groups = info["groups"]
    assert groups["model.layers.*.self_attn.q_proj"]["scheme"] == W4A16_G128.describe()
    assert groups["model.layers.*.self_attn.q_proj"]["modules"] == 2
    assert groups["model.layers.*.input_layernorm"]["scheme"] == "16-bit"
    # layer 1's down_proj (folded to *) and the untied lm_head
    assert info["not_quantized_linears"] == ["lm_head", "model.layers.*.mlp.down_proj"]
    assert "model.layers.1.mlp.down_proj" in info["format"]["ignore"]
    # tensor counts and sizes agree with the safetensors headers
    count = size = 0
    for f in safetensors_files(path):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                count, size = count + 1, size + t.numel() * t.element_size()
    assert sum(e["count"] for e in info["tensors"].values()) == count
    assert sum(e["bytes"] for e in info["tensors"].values()) == size
    assert info["backends"][W4A16_G128.describe()].startswith(("reference on cpu", "triton"))

    assert cli.main(["inspect", path]) == 0  # the text form names the same things
    text = capsys.readouterr().out
    assert "compressed-tensors" in text and W4A16_G128.describe() in text and "left in 16-bit" in text


def test_inspect_block_fp8(tmp_path, capsys):
    path = _quantized_checkpoint(tmp_path, FP8_BLOCK, writer="ct")
    assert cli.main(["inspect", path, "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["groups"]["model.layers.*.mlp.gate_proj"]["scheme"] == FP8_BLOCK.describe()
    assert info["tensors"]["F8_E4M3"]["count"] == 13


def test_inspect_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "lowbit: error:" in capsys.readouterr().err


def test_matrix_is_generated_from_backends_registry_and_results(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "h100.json").write_text(json.dumps({"gpu_tests": {"commit": "abc1234", "files": {
        "tests/layers/test_reference_schemes.py": {"passed": 42, "failed": 1}}}}))
    (results / "broken.json").write_text("{not json")  # ignored, not fatal
    ref = selection.backends_for("w4a16")[-1]
    columns = matrix.build_matrix(str(results))
    assert set(columns) == set(matrix.SCHEMES)
    for fam, col in columns.items():
        names = [b["name"] for b in col["gemm_backends"]]
        assert names == [b.name for b in selection.backends_for(fam)] and names[-1] == "reference"
        assert col["families"]["qwen moe"] == "N"  # no MoE model in the registry yet
        assert col["families"]["llama"] in ("S", "S(ref)") and col["families"]["qwen dense"] in ("S", "S(ref)")
    # the reference backend's GPU test status comes from the results file through its `tests` attribute
    tested = {b["name"]: b["gpu_tested"] for b in columns["w4a16"]["gemm_backends"]}
    assert ref.tests == "tests/layers/test_reference_schemes.py"
    assert tested["reference"] == ["h100: 42 passed, 1 failed @abc1234"]

    md = matrix.to_markdown(columns)
    for fam in matrix.FAMILIES:
        assert f"| {fam} |" in md
    assert md.splitlines()[0].startswith("| | w4a16 | w8a16 |")

    assert cli.main(["matrix", "--format", "json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(matrix.SCHEMES)


class _NeedsHopper:
    name, families, min_capability, tests = "hopper_only", ("w4a16",), (9, 0), None

    def can_implement(self, scheme, shape, device, dtype):
        return True, ""


class _Declines:
    name, families, min_capability, tests = "picky", ("w4a16",), None, None

    def can_implement(self, scheme, shape, device, dtype):
        return False, f"K={shape.k} is not a multiple of 64"


def test_selection_lists_why_every_backend_declined(monkeypatch):
    monkeypatch.setattr(selection, "_REGISTRY", {"w4a16": [_NeedsHopper(), _Declines()]})
    monkeypatch.setattr(selection, "_LOADED", True)
    shape, cpu = LayerShape(256, 200, (256,)), torch.device("cpu")
    with pytest.raises(NotImplementedError) as e:
        select_backend(W4A16_G128, shape, cpu, torch.float32, what="model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert msg.startswith("model.layers.0.mlp.down_proj: no backend can run w4a16")
    assert "hopper_only: needs a CUDA GPU (sm90+)" in msg and "picky: K=200 is not a multiple of 64" in msg
    # a forced backend that does not serve the scheme names the ones that do
    with pytest.raises(NotImplementedError, match=r"backend 'marlin' does not serve w4a16; .*\['hopper_only', 'picky'\]"):
        select_backend(W4A16_G128, shape, cpu, torch.float32, override="marlin", what="x")
    monkeypatch.setenv("LOWBIT_BACKEND", "hopper_only")  # the environment override, forced onto a CPU
    with pytest.raises(NotImplementedError, match="hopper_only: needs a CUDA GPU"):
        select_backend(W4A16_G128, shape, cpu, torch.float32, what="x")
