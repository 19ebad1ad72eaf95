"""int4 packings of the W4A8 checkpoints (ModelOpt W4A8_AWQ, DeepSeek W4AFP8) and the ModelOpt W4A8_AWQ writer.

| where                   | tensor    | dtype | shape          | packing                                                   |
|-------------------------|-----------|-------|----------------|-----------------------------------------------------------|
| ModelOpt (disk)         | `weight`  | uint8 | [N/2, K]       | signed q: row 2j -> bits 0..3, row 2j+1 -> bits 4..7 (`pack_int4_in_uint8`) |
| DeepSeek W4AFP8 (disk)  | `weight`  | int8  | [N, K/2]       | signed q: k = 2i -> bits 0..3, 2i+1 -> bits 4..7 (TRT-LLM `pack_int8_tensor_to_packed_int4`) |
| canonical (memory)      | `qweight` | int32 | [N, ceil(K/8)] | unsigned q + 8, eight per word along K, LSB-first         |

What the writer puts on disk (ModelOpt unified HF export, `modelopt/torch/export`, formats.md §6.1):
`weight` uint8 [N/2, K], `weight_scale` f32 [N, K/128] (= canonical `scales`), `input_scale` f32 [],
`pre_quant_scale` [K] where the scheme smooths its input, and `weight_scale_2` f32 []. ModelOpt's
`weight_scale_2` is the fp8 second quantizer's amax/448, calibrated on the original weight, which the canonical
tensors no longer hold; lowbit writes amax(|dequantized W|)/448 instead, shared (max) by the modules ModelOpt
fuses (q/k/v, gate/up). It differs from ModelOpt's by at most the int4 rounding of the largest weight, is only
a range hint for kernels that divide `weight_scale` by it, and lowbit's reader checks and drops it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lowbit.formats.base import QuantizedModule
from lowbit.kernels.reference import pack_int32, unpack_int32

GROUP = 128
FAMILY = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _signed(nibbles: torch.Tensor) -> torch.Tensor:
    return nibbles - ((nibbles & 8) << 1)  # two's complement int4: 8..15 -> -8..-1


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt uint8 [N/2, K] -> signed int32 [N, K]."""
    p = packed.to(torch.int32) & 0xFF
    return _signed(torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1, p.shape[1]))


def unpack_k(packed: torch.Tensor) -> torch.Tensor:
    """DeepSeek W4AFP8 int8 [N, K/2] -> signed int32 [N, K]."""
    p = packed.to(torch.int32) & 0xFF
    return _signed(torch.stack([p & 0xF, p >> 4], dim=2).reshape(p.shape[0], -1))


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """signed [N, K] (N even) -> ModelOpt uint8 [N/2, K]."""
    u = q.to(torch.int32) & 0xF
    return (u[0::2] | (u[1::2] << 4)).to(torch.uint8)


def canonical_qweight(q: torch.Tensor) -> torch.Tensor:
    """signed int4 [N, K] -> canonical offset-binary qweight int32 [N, ceil(K/8)]."""
    return pack_int32(q + 8, 4)


def _module_tensors(prefix: str, mod: QuantizedModule) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One module's on-disk tensors (without weight_scale_2) and the amax of its dequantized weight."""
    s, t = mod.scheme, mod.tensors
    if not (s.weight_dtype == "int4" and s.weight_granularity == "group" and s.group_size == GROUP and s.symmetric
            and not s.act_order and s.static_input_scale):
        raise ValueError(f"ModelOpt W4A8_AWQ writer: {prefix} has scheme {s.describe()}; supported: int4 group 128 "
                         "symmetric weights with static per-tensor fp8 activations (w4a8)")
    need = {"qweight", "scales", "input_scale"} | ({"pre_quant_scale"} if s.input_smoothing else set())
    if need - set(t) or set(t) - need - {"bias"}:
        raise ValueError(f"ModelOpt W4A8_AWQ writer: {prefix} has tensors {sorted(t)}; expected {sorted(need)} "
                         "(+ bias)")
    qweight, scales = t["qweight"], t["scales"]
    n, k = qweight.shape[0], 8 * qweight.shape[1]  # K = 8 * words: ModelOpt blocks need K % 128 == 0 anyway
    if n % 2:
        raise ValueError(f"ModelOpt W4A8_AWQ writer: {prefix}.qweight has N = {n} output rows (odd); ModelOpt packs "
                         "two rows per byte (uint8 [N/2, K]), so N must be even")
    if k % GROUP or tuple(scales.shape) != (n, k // GROUP):
        raise ValueError(f"ModelOpt W4A8_AWQ writer: {prefix}: qweight {tuple(qweight.shape)} (K = {k}) and scales "
                         f"{tuple(scales.shape)}; expected K % {GROUP} == 0 and scales ({n}, {k // GROUP})")
    q = unpack_int32(qweight, 4, k) - 8  # signed [N, K]
    out = {f"{prefix}.weight": pack_rows(q), f"{prefix}.weight_scale": scales.to(torch.float32),
           f"{prefix}.input_scale": t["input_scale"].to(torch.float32).reshape(())}
    for leaf in ("pre_quant_scale", "bias"):
        if leaf in t:
            out[f"{prefix}.{leaf}"] = t[leaf]
    amax = (q.abs().to(torch.float32) * scales.to(torch.float32).repeat_interleave(GROUP, dim=1)).max()
    return out, amax


def save_checkpoint(out_dir: str, config: dict, modules: dict[str, QuantizedModule], plain: dict[str, torch.Tensor],
                    ignore: Sequence[str] = (), max_shard_size: int = 5 * 2**30) -> None:
    """ModelOpt W4A8_AWQ unified checkpoint: hf_quant_config.json + config.json `quantization_config`
    (`convert_hf_config.py`: no config_groups for W4A8_AWQ) + safetensors. `ignore` -> exclude_modules."""
    from lowbit import __version__
    from lowbit.formats.fp8 import write_files

    if not modules:
        raise ValueError("ModelOpt W4A8_AWQ writer: no quantized modules given")
    both = sorted(set(ignore) & set(modules))
    if both:
        raise ValueError(f"ModelOpt W4A8_AWQ writer: modules {both} are both quantized and listed in ignore")
    tensors: dict[str, torch.Tensor] = {}
    amax: dict[str, torch.Tensor] = {}
    for prefix, mod in sorted(modules.items()):
        out, amax[prefix] = _module_tensors(prefix, mod)
        tensors.update(out)
    shared: dict[tuple[str, str], torch.Tensor] = {}
    for prefix, a in amax.items():
        parent, _, leaf = prefix.rpartition(".")
        key = (parent, FAMILY.get(leaf, leaf))
        shared[key] = torch.maximum(shared.get(key, a), a)
    for prefix in amax:
        parent, _, leaf = prefix.rpartition(".")
        ws2 = shared[(parent, FAMILY.get(leaf, leaf))].clamp(min=1e-12) / 448.0
        tensors[f"{prefix}.weight_scale_2"] = ws2.to(torch.float32).reshape(())
    clash = sorted(set(plain) & set(tensors))
    if clash:
        raise ValueError(f"ModelOpt W4A8_AWQ writer: plain tensors {clash[:5]} collide with quantized module tensors")
    producer = {"name": "modelopt", "version": f"lowbit-{__version__}"}  # the layout is ModelOpt's, the writer lowbit
    hf_quant = {"producer": producer, "quantization": {
        "quant_algo": "W4A8_AWQ", "kv_cache_quant_algo": None, "group_size": GROUP, "has_zero_point": False,
        "pre_quant_scale": any("pre_quant_scale" in m.tensors for m in modules.values()),
        "exclude_modules": list(ignore)}}  # False when the smoothing was folded into the previous ops
    qcfg = {"ignore": list(ignore), "quant_algo": "W4A8_AWQ", "producer": producer, "quant_method": "modelopt"}
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    write_files(out_dir, {**config, "quantization_config": qcfg}, {**tensors, **plain}, max_shard_size,
                {"hf_quant_config.json": hf_quant})
