"""NVIDIA ModelOpt unified HF checkpoints (`hf_quant_config.json` `quantization.quant_algo`) and DeepSeek-R1
W4AFP8 (TRT-LLM `quantize_mixed_precision_moe.py`, quant_algo MIXED_PRECISION). Writer: modelopt_w4a8.py.

On disk, per quantized Linear [N, K] (formats.md §5.3, §6.1, §6.2):

| quant_algo (per layer)  | tensor             | dtype    | shape        | meaning                                        |
|-------------------------|--------------------|----------|--------------|------------------------------------------------|
| FP8                     | `weight`           | e4m3fn   | [N, K]       | W = weight * weight_scale                      |
|                         | `weight_scale`, `input_scale` | f32 | []  | amax/448; activations static                   |
| W4A8_AWQ (ModelOpt)     | `weight`           | uint8    | [N/2, K]     | signed int4, row 2j low nibble, 2j+1 high      |
|                         | `weight_scale`     | f32      | [N, K/G]     | W = q * weight_scale (amax/7), G = 128         |
|                         | `weight_scale_2`   | f32      | []           | fp8 second-level scale: checked, then dropped  |
|                         | `input_scale`      | f32      | []           | static fp8 activation scale                    |
|                         | `pre_quant_scale`  | model    | [K]          | AWQ smoothing where not folded (o/down_proj)   |
| W4A8_AWQ (DeepSeek W4AFP8 experts) | `weight` | int8    | [N, K/2]     | signed int4 along K, even k low nibble         |
|                         | `weight_scale_inv` | f32      | [N, K/128]   | W = q * s (MULTIPLIES)                         |
|                         | `experts.E.w1/w2/w3.input_scale` | f32 | [1] | gate/down/up static fp8 activation scale  |
| FP8_BLOCK_SCALES        | `weight` + `weight_scale_inv` | e4m3fn + f32 | [N, K] + [ceil(N/128), ceil(K/128)] | as fp8.py |
| (KV cache)              | `k_proj.k_scale`, `v_proj.v_scale` | f32 | [] | dropped: no fp8 KV cache yet             |

In memory (canonical, lowbit/scheme.py): int4 W4A8 -> `qweight` int32 [N, ceil(K/8)] (q + 8, LSB-first along K),
`scales` f32 [N, ceil(K/G)] (W = (q' - 8) * scale, symmetric), `input_scale` f32 [], `pre_quant_scale` [K]
(scheme.input_smoothing); fp8 layers as in fp8.py. Which layout a module has is read from the headers
(weight dtype F8_E4M3 / U8 / I8); the configured algorithm per layer must agree with it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Iterator

import torch

from lowbit.config import ModelConfig
from lowbit.formats.base import CheckpointFormat, FormatError, read_json
from lowbit.formats.fp8 import (FP8, KV_SCALES, Leaves, block_scheme, check_block, check_scalar, check_tensor, listed,
                                positive_scalar, read_headers, reject_stray_scales, warn_kv_scales)
from lowbit.formats.modelopt_w4a8 import canonical_qweight, save_checkpoint, unpack_k, unpack_rows  # noqa: F401
from lowbit.scheme import FP8_TENSOR_STATIC, QuantScheme

ALGOS = ("FP8", "W4A8_AWQ", "MIXED_PRECISION")
LAYER_ALGOS = ("FP8", "FP8_BLOCK_SCALES", "W4A8_AWQ")
LAYOUTS = {FP8: "fp8", "U8": "int4_rows", "I8": "int4_k"}  # weight dtype -> packing
# TRT-LLM / quant_cfg.json name fused modules; lowbit asks for the on-disk (unfused) ones
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj", "q_a_proj": "fused_a", "kv_a_proj_with_mqa": "fused_a"}
EXPERT_INPUT = re.compile(r"^(.*\.experts\.\d+)\.w([123])\.input_scale$")  # SGLang make_expert_input_scale_params_mapping
W_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj$")


def _rename(name: str) -> str:
    m = EXPERT_INPUT.match(name)
    return f"{m[1]}.{W_NAMES[m[2]]}.input_scale" if m else name


def _lookup(prefix: str, layers: dict[str, dict]) -> dict | None:
    """The quantized_layers entry of a module: its own name, its fused name, or a parent (`mlp.experts`)."""
    parent, _, leaf = prefix.rpartition(".")
    names = [prefix] + ([f"{parent}.{FUSED[leaf]}"] if leaf in FUSED else [])
    parts = prefix.split(".")
    names += [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return next((layers[n] for n in names if n in layers), None)


def _layer_algo(prefix: str, leaves: Leaves, algo: str, layers: dict | None, group: int) -> tuple[str, int]:
    if algo != "MIXED_PRECISION":
        return algo, group
    if layers is None:  # DeepSeek W4AFP8 convention: routed experts int4, everything else block fp8
        return ("W4A8_AWQ" if ROUTED_EXPERT.search(prefix) else "FP8_BLOCK_SCALES"), group
    entry = _lookup(prefix, layers)
    if entry is None:  # quantized on disk but not in the map: follow the tensors
        if leaves["weight"][0] != FP8:
            return "W4A8_AWQ", group
        return ("FP8" if "weight_scale" in leaves and "weight_scale_inv" not in leaves else "FP8_BLOCK_SCALES"), group
    got = str(entry.get("quant_algo", "")).upper()
    if got not in LAYER_ALGOS:
        raise NotImplementedError(f"{prefix}: quantized_layers quant_algo {entry.get('quant_algo')!r} is not "
                                  f"supported; supported: {LAYER_ALGOS}")
    return got, int(entry.get("group_size") or group)


def _check_int4(prefix: str, leaves: Leaves, group: int) -> str:
    """Shapes of either int4 packing; returns the layout."""
    dtype, shape = leaves["weight"]
    if len(shape) != 2:
        raise FormatError(f"{prefix}.weight: int4 weight of shape {shape}; expected 2-D")
    if dtype == "U8":  # ModelOpt: [N/2, K], two output rows per byte
        scale_name, k = "weight_scale", shape[1]
    elif dtype == "I8":  # DeepSeek W4AFP8: [N, K/2], two K elements per byte
        scale_name, k = "weight_scale_inv", 2 * shape[1]
    else:
        raise FormatError(f"{prefix}.weight: {dtype}, but W4A8_AWQ stores int4 in uint8 [N/2, K] (ModelOpt) or "
                          "int8 [N, K/2] (DeepSeek W4AFP8)")
    if scale_name not in leaves:
        raise FormatError(f"{prefix}.{scale_name} is missing: int4 weight {prefix}.weight ({dtype}) needs its "
                          f"[N, K/{group}] group scales")
    sshape = leaves[scale_name][1]
    n = sshape[0] if sshape else 0
    if dtype == "U8" and n % 2:
        raise FormatError(f"{prefix}.{scale_name}: N = {n} output rows is odd; ModelOpt packs two rows per byte "
                          "(weight uint8 [N/2, K]), so N must be even")
    rows = shape[0] * 2 if dtype == "U8" else shape[0]
    if sshape != (rows, -(-k // group)):
        raise FormatError(f"{prefix}.{scale_name}: shape {sshape}, expected {(rows, -(-k // group))} for {dtype} "
                          f"weight {shape} (N = {rows}, K = {k}, group {group})")
    if "weight_scale_2" in leaves:
        check_scalar(prefix, leaves, "weight_scale_2", "")
    if "pre_quant_scale" in leaves and leaves["pre_quant_scale"][1] != (k,):
        raise FormatError(f"{prefix}.pre_quant_scale: shape {leaves['pre_quant_scale'][1]}, expected ({k},)")
    check_scalar(prefix, leaves, "input_scale", "W4A8 activations are static fp8, one scale per module "
                 "(DeepSeek W4AFP8 experts: experts.E.w1/w2/w3.input_scale)")
    return "int4_rows" if dtype == "U8" else "int4_k"


def _check(prefix: str, leaves: Leaves, algo: str, group: int) -> tuple[QuantScheme, str]:
    dtype = leaves["weight"][0]
    if algo == "W4A8_AWQ":
        layout = _check_int4(prefix, leaves, group)
        return QuantScheme("int4", "group", group_size=group, act_dtype="fp8_e4m3", act_granularity="tensor_static",
                           input_smoothing="pre_quant_scale" in leaves), layout
    if dtype != FP8:
        raise FormatError(f"{prefix}.weight: {dtype}, but quant_algo {algo} stores float8_e4m3fn weights")
    if algo == "FP8":
        check_tensor(prefix, leaves, static=True)
        return FP8_TENSOR_STATIC, "fp8_tensor"
    check_block(prefix, leaves, (128, 128))  # TRT-LLM FP8_BLOCK_SCALES: 128x128 weights, 1x128 activations
    return block_scheme((128, 128), ue8m0=False), "fp8_block"


class ModelOptFormat(CheckpointFormat):
    name = "modelopt"

    def __init__(self, backend: str | None, schemes: dict[str, QuantScheme], layouts: dict[str, str],
                 info: dict[str, Any]):
        super().__init__(backend)
        self.schemes, self.layouts, self.info = schemes, layouts, info

    @staticmethod
    def _section(model_dir: str, cfg: ModelConfig) -> dict:
        hf = read_json(os.path.join(model_dir, "hf_quant_config.json"))
        return (hf or {}).get("quantization") or (cfg.quantization or {})

    @classmethod
    def matches(cls, model_dir: str, cfg: ModelConfig) -> bool:
        hf = read_json(os.path.join(model_dir, "hf_quant_config.json")) or {}
        return bool((hf.get("quantization") or {}).get("quant_algo")) or \
            (cfg.quantization or {}).get("quant_method") == "modelopt"

    @classmethod
    def from_checkpoint(cls, model_dir: str, cfg: ModelConfig, backend: str | None = None) -> "ModelOptFormat":
        q = cls._section(model_dir, cfg)
        algo = str(q.get("quant_algo") or "").upper()
        if algo not in ALGOS:
            raise NotImplementedError(f"ModelOpt quant_algo {q.get('quant_algo')!r} is not supported; "
                                      f"supported: {ALGOS}")
        exclude = list(q.get("exclude_modules") or q.get("ignore") or [])
        group = int(q.get("group_size") or 128)
        layers = None
        if algo == "MIXED_PRECISION":
            layers = q.get("quantized_layers") or \
                (read_json(os.path.join(model_dir, "quant_cfg.json")) or {}).get("quantized_layers")
        modules = read_headers(model_dir, _rename)
        schemes, layouts = {}, {}
        for prefix, leaves in sorted(modules.items()):
            w = leaves.get("weight")
            if w is None or w[0] not in LAYOUTS:
                reject_stray_scales(prefix, leaves, ("weight_scale", "weight_scale_inv", "weight_scale_2"),
                                    f"quantized weights are {sorted(LAYOUTS)}")
                continue
            if listed(prefix, exclude):
                raise FormatError(f"{prefix}.weight is stored quantized ({w[0]}) but {prefix} is excluded "
                                  "(exclude_modules)")
            schemes[prefix], layouts[prefix] = _check(prefix, leaves, *_layer_algo(prefix, leaves, algo, layers, group))
        if not schemes:
            raise FormatError(f"{model_dir}: ModelOpt {algo} checkpoint without any quantized weight")
        info = {"quant_algo": algo, "layouts": dict(Counter(layouts.values())), "excluded": exclude,
                "per_layer_map": layers is not None, "dropped": warn_kv_scales(modules, f"ModelOpt {algo}")}
        return cls(backend, schemes, layouts, info)

    def scheme_for(self, prefix: str) -> QuantScheme | None:
        return self.schemes.get(prefix)

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        name = _rename(name)
        prefix, _, leaf = name.rpartition(".")
        layout = self.layouts.get(prefix)
        if leaf in KV_SCALES:
            return
        if layout is None or leaf not in ("weight", "weight_scale", "weight_scale_inv", "weight_scale_2",
                                          "input_scale"):
            yield name, tensor  # 16-bit modules, bias, pre_quant_scale
        elif leaf == "input_scale":
            if self.schemes[prefix].static_input_scale:
                yield name, positive_scalar(name, tensor)
        elif leaf == "weight_scale_2":  # the canonical `scales` are absolute already
            positive_scalar(name, tensor)
        elif layout.startswith("fp8"):
            if leaf == "weight_scale_inv":
                yield f"{prefix}.weight_scale", tensor.to(torch.float32)
            else:
                yield name, tensor if leaf == "weight" else positive_scalar(name, tensor)
        elif leaf == "weight":
            q = unpack_rows(tensor) if layout == "int4_rows" else unpack_k(tensor)  # signed [N, K]
            yield f"{prefix}.qweight", canonical_qweight(q)
        else:
            yield f"{prefix}.scales", tensor.to(torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "schemes": dict(Counter(s.describe() for s in self.schemes.values())),
                **self.info}
