"""`lowbit inspect PATH`: what a checkpoint is before you run it.

Reads config.json and the safetensors headers only (no tensor data): the format, the scheme of each
layer group (layer and expert indices folded to `*`), the modules left in 16-bit, tensor counts and
sizes by dtype, and which backend would run each scheme on this machine (or why none can).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

from safetensors import safe_open

from lowbit.config import load_config
from lowbit.formats.base import detect_format, safetensors_files

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def layer_group(prefix: str) -> str:
    return re.sub(r"\.(\d+)(?=\.|$)", ".*", prefix)


def _headers(model_dir: str):
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                yield key, sl.get_dtype(), tuple(sl.get_shape())


def inspect_checkpoint(model_dir: str) -> dict:
    from lowbit.hub import resolve_model

    model_dir = resolve_model(model_dir)
    cfg = load_config(model_dir)
    fmt = detect_format(model_dir, cfg)
    groups: dict[str, dict] = {}
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    sixteen_bit_linears: set[str] = set()
    for key, dtype, shape in _headers(model_dir):
        n = 1
        for d in shape:
            n *= d
        by_dtype[dtype][0] += 1
        by_dtype[dtype][1] += n * _DTYPE_BYTES.get(dtype, 0)
        prefix, _, leaf = key.rpartition(".")
        scheme = fmt.scheme_for(prefix)
        group = layer_group(prefix)
        entry = groups.setdefault(group, {"scheme": scheme.describe() if scheme else "16-bit", "modules": set(),
                                          "bytes": 0})
        entry["modules"].add(prefix)
        entry["bytes"] += n * _DTYPE_BYTES.get(dtype, 0)
        if scheme is None and leaf == "weight" and len(shape) == 2 and "embed" not in prefix:
            sixteen_bit_linears.add(group)
    return {
        "path": model_dir,
        "architecture": cfg.architecture,
        "format": fmt.describe(),
        "groups": {g: {"scheme": e["scheme"], "modules": len(e["modules"]), "bytes": e["bytes"]}
                   for g, e in sorted(groups.items())},
        "not_quantized_linears": sorted(sixteen_bit_linears),
        "tensors": {d: {"count": c, "bytes": b} for d, (c, b) in sorted(by_dtype.items())},
        "backends": _backends(fmt, groups),
    }


def _backends(fmt, groups) -> dict[str, str]:
    """For each scheme in the checkpoint: the backend that would run it here, or every reason why not."""
    import torch

    from lowbit.layers.selection import LayerShape, select_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    for group in groups:
        scheme = fmt.scheme_for(next(iter(groups[group]["modules"])))
        if scheme is None or scheme.describe() in out:
            continue
        try:
            backend = select_backend(scheme, LayerShape(4096, 4096, (4096,)), device, dtype, what=group)
            out[scheme.describe()] = f"{backend.name} on {device}"
        except NotImplementedError as e:
            out[scheme.describe()] = f"none on {device}: {e}"
    return out


def format_text(info: dict) -> str:
    lines = [f"{info['path']}", f"  architecture: {info['architecture']}",
             f"  format: {', '.join(f'{k}={v}' for k, v in info['format'].items())}", "", "  layer groups:"]
    width = max((len(g) for g in info["groups"]), default=10)
    for g, e in info["groups"].items():
        lines.append(f"    {g.ljust(width)}  x{e['modules']:<4} {e['bytes'] / 2**20:9.2f} MiB  {e['scheme']}")
    if info["not_quantized_linears"] and info["format"].get("format") != "unquantized":
        lines += ["", "  left in 16-bit (ignored by the quantization):"]
        lines += [f"    {g}" for g in info["not_quantized_linears"]]
    lines += ["", "  tensors:"]
    total = 0
    for d, e in info["tensors"].items():
        lines.append(f"    {d:8s} {e['count']:6d} tensors {e['bytes'] / 2**20:10.2f} MiB")
        total += e["bytes"]
    lines.append(f"    total    {sum(e['count'] for e in info['tensors'].values()):6d} tensors {total / 2**20:10.2f} MiB")
    if info["backends"]:
        lines += ["", "  kernels on this machine:"]
        lines += [f"    {s}: {b}" for s, b in info["backends"].items()]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("path", help="model directory (or hub id)")
    p.add_argument("--format", choices=["text", "json"], default="text")


def run(args) -> int:
    info = inspect_checkpoint(args.path)
    print(json.dumps(info, indent=1) if args.format == "json" else format_text(info))
    return 0
