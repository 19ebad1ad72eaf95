"""The triton_w4a16 backend: selection on CUDA (and declining on the CPU), and a tiny GPTQ model whose
logits match the reference backend."""

from __future__ import annotations

import pytest
import torch

from lowbit.layers.linear import Linear
from lowbit.layers.quant_methods import IntWeightMethod
from lowbit.layers.selection import LayerShape, backends_for
from lowbit.scheme import QuantScheme
from tests.formats.gptq_fixtures import act_order_g_idx, gptq_tensors, quantize_hf_model, write_dir
from tests.formats.test_gptq import qcfg
from tests.helpers import Stepper, make_hf_model


def test_registered_first_and_declines_cpu_and_fp32():
    b = backends_for("w4a16")[0]
    assert b.name == "triton_w4a16" and b.families == ("w4a16", "w8a16") and b.min_capability == (8, 0)
    scheme = QuantScheme("int4", "group", group_size=128)
    shape = LayerShape(256, 576, (256,))
    ok, reason = b.can_implement(scheme, shape, torch.device("cpu"), torch.float16)
    assert not ok and "CUDA" in reason
    ok, reason = b.can_implement(scheme, shape, torch.device("cuda"), torch.float32)
    assert not ok and "float32" in reason
    ok, reason = b.can_implement(QuantScheme("int4", "group", group_size=16), shape, torch.device("cuda"),
                                 torch.float16)
    assert not ok and "16" in reason


def test_cpu_layer_falls_back_to_reference():
    layer = Linear(128, [64, 32], quant_method=IntWeightMethod(QuantScheme("int4", "group", group_size=64)),
                   dtype=torch.float16, prefix="l")
    layer.qweight.data.random_(-2**31, 2**31 - 1)
    layer.scales.data.fill_(0.01)
    layer.process_after_loading()
    assert layer.backend.name == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("sym,group,act", [(True, 32, False), (False, 32, True), (True, -1, False)])
def test_tiny_model_selects_triton_and_matches_reference(tmp_path, monkeypatch, sym, group, act):
    hf = make_hf_model("llama", str(tmp_path), seed=5)
    extra = {"g_idx_fn": lambda k, g, seed: act_order_g_idx(k, g, 0)} if act else {}  # shared by fused shards

    def pick(prefix):
        return None if prefix == "lm_head" else dict(bits=4, group_size=group, sym=sym, **extra)

    def pack(q, scales, zeros, g_idx, s):
        return gptq_tensors(q, scales, zeros, g_idx, 4, "gptq_v2")

    write_dir(str(tmp_path), quantize_hf_model(hf, str(tmp_path), pick, pack),
              qcfg(4, group, sym, desc_act=act, fmt="gptq_v2"))
    prompt = [3, 7, 11, 5, 9, 2]
    logits = {}
    for backend in ("triton_w4a16", "reference"):
        if backend == "reference":
            monkeypatch.setenv("LOWBIT_BACKEND", "reference")
        st = Stepper(str(tmp_path), device="cuda", dtype=torch.float16)
        names = {getattr(m, "backend", None).name for m in st.model.modules() if hasattr(m, "backend")}
        assert names == {backend}, names
        seq = st.add(prompt)
        logits[backend] = [st.step({seq.seq_id: t})[seq.seq_id].float() for t in (4, 8, 6)]
    for a, b in zip(logits["triton_w4a16"], logits["reference"]):
        assert (a - b).abs().max().item() < 2e-2 * max(1.0, b.abs().max().item())
