"""`lowbit quantize [MODEL] --scheme SCHEME --out DIR`: the command line over `lowbit.quant.quantize`.

  lowbit quantize --scheme w4a16-gptq --out smol-gptq --group-size 64        # the embedded SmolLM2
  lowbit quantize org/model --scheme fp8-block --out m-fp8 --format fp8-block
  lowbit quantize ./model --scheme w4a8-awq --out m-w4a8 --format modelopt --calib data.jsonl
"""

from __future__ import annotations

import argparse

from lowbit.quant.recipes import FORMATS, SCHEMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model directory or hub id (default: embedded SmolLM2)")
    p.add_argument("-m", "--model", dest="model_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scheme", required=True, help=f"one of: {', '.join(SCHEMES)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="compressed-tensors", help=f"one of: {', '.join(FORMATS)} (default compressed-tensors)")
    p.add_argument("--calib", default=None,
                   help="calibration text: file, folder, JSONL, or HF dataset name (default: license texts)")
    p.add_argument("--num-samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int weight group size along K (default 128; w8a16: per channel); 0 or -1 = per channel")
    p.add_argument("--asym", dest="symmetric", action="store_false", default=None,
                   help="int weights with zero points (default: symmetric; the awq format: zero points)")
    p.add_argument("--sym", dest="symmetric", action="store_true", help="int weights without zero points")
    p.add_argument("--act-order", default="static", choices=("off", "static", "dynamic"),
                   help="GPTQ column order: static (act-order, groups fixed up front; default), dynamic (g_idx), off")
    p.add_argument("--ignore", action="append", default=[],
                   help="module name, suffix or re:REGEX kept 16-bit (repeatable, comma-separated allowed); "
                        "lm_head and MoE routers are always kept")
    p.add_argument("--device", default=None, help="calibration device (default: cuda when present, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from lowbit.quant.api import quantize

    ignore = [p for item in args.ignore for p in item.split(",") if p]
    quantize(args.model or args.model_opt, args.scheme, args.out, calib=args.calib, num_samples=args.num_samples,
             seq_len=args.seq_len, seed=args.seed, group_size=args.group_size, symmetric=args.symmetric,
             act_order=args.act_order, ignore=ignore, fmt=args.format, device=args.device,
             batch_size=args.batch_size, progress=not args.no_progress)
    return 0
