"""Dispatch to one kernel sweep; each module exposes `main(args)` and writes its own results section."""

from __future__ import annotations

import argparse
import importlib

SWEEPS = {
    "w4a16": "bench.kernels.w4a16",
    "fp8": "bench.kernels.fp8",
    "w4a8": "bench.kernels.w4a8",
    "act_quant": "bench.kernels.act_quant",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels")
    parser.add_argument("sweep", choices=sorted(SWEEPS) + ["all"])
    parser.add_argument("--quick", action="store_true", help="a few shapes and M values only")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--ms", default=None, help="w4a8, w4a16: comma-separated M values instead of the sweep's")
    args = parser.parse_args()
    for name in sorted(SWEEPS) if args.sweep == "all" else [args.sweep]:
        importlib.import_module(SWEEPS[name]).main(args)


if __name__ == "__main__":
    main()
