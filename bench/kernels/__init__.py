"""Kernel benchmarks: `python -m bench.kernels {w4a16,fp8,w4a8,act_quant} [--quick] [--out DIR]`."""
