"""AWQ: folding the smoothing scales leaves the float model unchanged; the searches never lose to RTN."""

from __future__ import annotations

import torch

from lowbit.quant import awq
from lowbit.quant.capture import InputStats, collect, decoder_layers, first_layer_inputs, linear_groups, run_layer
from lowbit.quant.layerwise import awq_smooth
from lowbit.quant.recipes import make_recipe
from lowbit.quant.rtn import fake_quantize


def _model(tiny_tokenizer_dir, tmp_path, **kw):
    from tests.helpers import make_hf_model

    return make_hf_model("llama", str(tmp_path), tokenizer_dir=tiny_tokenizer_dir, **kw)


@torch.no_grad()
def test_folded_model_equals_unfolded_in_float(tiny_tokenizer_dir, tmp_path):
    # no GQA, so o_proj's scale folds into v_proj too; every group of the layer is smoothed
    model = _model(tiny_tokenizer_dir, tmp_path, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    recipe = make_recipe("w4a16-awq", 32)
    inputs = first_layer_inputs(model, ids, 2, "cpu")
    notes = []
    for layer in decoder_layers(model):
        groups = linear_groups(layer, inputs[0])
        assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        stats = [InputStats() for _ in groups]
        handles = [collect(layer.get_submodule(g[0]), s, stop=False) for g, s in zip(groups, stats)]
        run_layer(layer, inputs)
        for h in handles:
            h.remove()
        for g, s in zip(groups, stats):
            notes.append(awq_smooth(recipe, layer, g, s, torch.float32))
        inputs = run_layer(layer, inputs)
    assert all(n.startswith("smoothing into") for n in notes), notes
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_gqa_o_proj_is_not_smoothed(tiny_tokenizer_dir, tmp_path):
    model = _model(tiny_tokenizer_dir, tmp_path)  # TINY: 4 heads, 2 kv heads -> v_proj out 32 != o_proj in 64
    layer = decoder_layers(model)[0]
    stats = InputStats()
    stats.update(torch.randn(16, 64))
    note = awq_smooth(make_recipe("w4a16-awq", 32), layer, ["self_attn.o_proj"], stats, torch.float32)
    assert note.startswith("no smoothing")


def test_scale_and_clip_search_never_lose_to_rtn():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 64, generator=g) * torch.linspace(0.1, 6, 64)  # salient channels at the end
    h = x.t() @ x
    w = torch.randn(32, 64, generator=g)
    s, best, base = awq.search_scale(w, h, x.abs().mean(0), 4, 32, False)
    assert best <= base and s.shape == (64,)
    rtn = float(awq.output_error(w, fake_quantize(w, 4, 32, False), h))
    assert abs(base - rtn) <= 1e-4 * rtn  # alpha = 0 is plain RTN
    clip = awq.search_clip(w, h, 4, 32, False)
    assert clip.shape == (32, 2) and (clip <= 1).all() and (clip >= 0.5).all()
    clipped = float(awq.output_error(w, fake_quantize(w, 4, 32, False, clip), h))
    assert clipped <= rtn * (1 + 1e-5)
