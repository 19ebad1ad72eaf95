"""GPTQ wall time on a Llama-3-8B-shaped model with random weights, timed on a few decoder layers.

  python bench/gptq_speed.py --layers 3 --samples 128 --seq-len 2048      # on a GPU
  python bench/gptq_speed.py --tiny                                       # CPU smoke run of the script

Every decoder layer of Llama-3-8B has the same shapes (hidden 4096, intermediate 14336, 32 q / 8 kv heads),
and lowbit's pipeline holds one layer's inputs at a time, so the full 32-layer time is extrapolated as
  capture (embedding forward, measured) + 32 * mean(per-layer time over the measured layers after the first).
The extrapolation is stated as such in the output; the model is random, so the error numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
FULL_LAYERS = 32


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (checks the script only)")
    p.add_argument("--out", default=None, help="JSON result path")
    args = p.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.quant.pipeline import quantize_hf_model
    from lowbit.quant.recipes import make_recipe
    from lowbit.quant.report import error_summary

    shape = dict(LLAMA3_8B)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        shape.update(vocab_size=1000, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2)
        args.samples, args.seq_len = min(args.samples, 8), min(args.seq_len, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=args.layers, **shape)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    samples = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len))
    recipe = make_recipe("w4a16-gptq", args.group_size)
    layers = model.model.layers
    starts: dict[int, float] = {}

    def mark(i):
        def hook(module, args):  # returns None: the inputs pass unchanged
            starts.setdefault(i, time.perf_counter())
        return hook

    # the first call of layer i = the start of its quantization (layer 0: of the capture)
    hooks = [layer.register_forward_pre_hook(mark(i)) for i, layer in enumerate(layers)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = quantize_hf_model(model, recipe, samples, batch_size=args.batch_size, scale_dtype=torch.bfloat16,
                               checkpoint_dtype=dtype, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    capture = result.seconds.get("capture", 0.0)
    # layer i's quantization starts at its first call (linear_groups probe) and ends where layer i+1 starts
    ends = [starts.get(i + 1) for i in range(args.layers - 1)] + [t0 + result.seconds["quantize"]]
    layer_times = [e - starts[i] for i, e in enumerate(ends)]
    steady = layer_times[1:] or layer_times
    per_layer = sum(steady) / len(steady)
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "shape": "Llama-3-8B (random weights)" if not args.tiny else "tiny",
        "layers_measured": args.layers, "samples": args.samples, "seq_len": args.seq_len,
        "group_size": args.group_size, "act_order": recipe.act_order, "true_sequential": True,
        "capture_seconds": round(capture, 2), "layer_seconds": [round(t, 2) for t in layer_times],
        "measured_total_seconds": round(total, 2),
        "extrapolated_32_layer_seconds": round(capture + FULL_LAYERS * per_layer, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
        "summary": error_summary(result.reports),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
