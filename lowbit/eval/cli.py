"""`lowbit eval ppl [MODEL] [--text FILE]`: perplexity through lowbit's engine model.

Without --text, the held-out license texts (Apache-2.0, MPL-1.1, MPL-2.0 from
/usr/share/common-licenses; never used by `lowbit quantize`'s default calibration) are scored.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity with a sliding window")
    ppl.add_argument("model", nargs="?", default=None, help="model directory or hub id (default: embedded SmolLM2)")
    ppl.add_argument("-m", "--model", dest="model_opt", default=None, help=argparse.SUPPRESS)
    ppl.add_argument("--text", default=None, help="text file to score (default: held-out license texts)")
    ppl.add_argument("--context-len", type=int, default=512, help="window length in tokens (default 512)")
    ppl.add_argument("--stride", type=int, default=256, help="window start every STRIDE tokens (default 256)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    ppl.add_argument("--device", default="auto")
    ppl.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    ppl.add_argument("--backend", default=None, help="force one kernel backend (e.g. reference)")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")


def evaluate_ppl(model: str | None, text: str | None = None, context_len: int = 512, stride: int = 256,
                 max_tokens: int | None = None, device: str = "auto", dtype: str = "auto",
                 backend: str | None = None, progress: bool = True) -> dict:
    import time

    from transformers import AutoTokenizer

    from lowbit.engine.llm import pick_device, pick_dtype
    from lowbit.eval.ppl import lowbit_logits_fn, perplexity, tokenize
    from lowbit.hub import resolve_model
    from lowbit.models.loader import load_model
    from lowbit.quant.calibration import default_eval_text

    model_dir = resolve_model(model)
    dev = pick_device(device)
    t0 = time.perf_counter()
    net, _ = load_model(model_dir, dev, pick_dtype(dtype, dev), backend)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(model_dir)
    if text is None:
        body, source = default_eval_text(), "held-out licenses (Apache-2.0, MPL-1.1, MPL-2.0)"
    else:
        with open(text, encoding="utf-8", errors="replace") as f:
            body, source = f.read(), text
    res = perplexity(lowbit_logits_fn(net, dev), tokenize(tok, body, max_tokens), context_len, stride, progress)
    return {"model": model_dir, "text": source, "load_seconds": round(load_s, 2), **res.as_dict()}


def run(args) -> int:
    out = evaluate_ppl(args.model or args.model_opt, args.text, args.context_len, args.stride, args.max_tokens,
                       args.device, args.dtype, args.backend)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['model']}: ppl {out['ppl']:.4f} over {out['tokens']} tokens of {out['text']} "
              f"(context {out['context_len']}, stride {out['stride']}; {out['seconds']:.1f}s, load {out['load_seconds']:.1f}s)")
    return 0
