"""AWQ checkpoints (AutoAWQ `version: "gemm"`, 4-bit with zero points). Read and write.

On disk, per quantized Linear `<prefix>.` (G group, -1 = one group of K; formats.md §2):

| tensor    | dtype      | shape        | layout                                                             |
|-----------|------------|--------------|--------------------------------------------------------------------|
| `qweight` | int32      | [K, N/8]     | packed along N; slot i of word c holds column 8c + [0,2,4,6,1,3,5,7][i] |
| `qzeros`  | int32      | [K/G, N/8]   | packed like qweight; the true zero (no -1, unlike GPTQ v1)          |
| `scales`  | fp16       | [K/G, N]     | W[k, n] = (q[k, n] - z[k//G, n]) * s[k//G, n]                      |
| `bias`    | fp16       | [N]          | optional                                                           |

In memory (canonical, lowbit/scheme.py):

| tensor    | dtype   | shape       | from disk                                                    |
|-----------|---------|-------------|--------------------------------------------------------------|
| `qweight` | int32   | [N, K/8]    | un-interleave along N, transpose, pack along K (sequential)  |
| `scales`  | float32 | [N, K/G]    | scales.T                                                     |
| `zeros`   | int32   | [N, K/G]    | un-interleaved qzeros.T                                      |

GEMV / GEMV_fast / Marlin / exllama versions lay tensors out differently and are refused by name.
Which modules are quantized: the tensors decide (a `.qweight`); `modules_to_not_convert` naming a module
(exact name or dotted suffix) that has a qweight is a contradiction and fails.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterator

import torch

from lowbit.config import ModelConfig
from lowbit.formats.base import CheckpointFormat, FormatError, QuantizedModule, matches_any, read_json
from lowbit.formats.int_packing import (AWQ_ORDER, canonical_tensors, check_groups, check_leaves, check_names,
                                        exact_cast, in_block_linears, int_scheme, pack_cols, scan_headers,
                                        scheme_group, unpack_cols, write_checkpoint)
from lowbit.kernels.reference import pack_int32, unpack_int32
from lowbit.scheme import QuantScheme

VERSIONS = ("gemm",)
OTHER_VERSIONS = ("gemv", "gemv_fast", "marlin", "exllama", "ipex")
LEGACY_CONFIG = "quant_config.json"  # AutoAWQ, beside a config.json without quantization_config


def parse_config(raw: dict[str, Any], where: str) -> tuple[QuantScheme, list[str]]:
    """(the scheme every AWQ module shares, modules_to_not_convert)."""
    method = str(raw.get("quant_method", "awq")).lower()
    if method != "awq":
        raise FormatError(f"{where}: quant_method {method!r} is not AWQ; supported: awq")
    version = str(raw.get("version", "gemm")).lower()
    if version not in VERSIONS:
        known = "known, with another layout" if version in OTHER_VERSIONS else "unknown"
        raise NotImplementedError(f"{where}: AWQ version {version!r} ({known}) is not supported; supported: {VERSIONS}")
    if str(raw.get("backend", "autoawq")).lower() not in ("autoawq", "auto"):
        raise NotImplementedError(f"{where}: AWQ backend {raw['backend']!r} is not supported; supported: autoawq")
    bits = raw.get("bits", raw.get("w_bit"))
    if bits != 4:
        what = "2/3-bit weights are not supported" if bits in (2, 3) else f"bits={bits!r} is not supported"
        raise NotImplementedError(f"{where}: AWQ {what}; the GEMM layout packs 4-bit only (supported bits: 4)")
    if not raw.get("zero_point", True):
        raise NotImplementedError(f"{where}: AWQ zero_point=false (symmetric) has no GEMM layout; "
                                  "supported: zero_point true")
    scheme = int_scheme(4, raw.get("group_size", raw.get("q_group_size", 128)), False, False, f"{where} (AWQ)")
    return scheme, list(raw.get("modules_to_not_convert") or [])


def _config_source(model_dir: str, cfg: ModelConfig) -> tuple[dict, str]:
    if cfg.quantization is not None:
        return cfg.quantization, "config.json quantization_config"
    for name in (LEGACY_CONFIG, "quantize_config.json"):
        raw = read_json(os.path.join(model_dir, name))
        if raw is not None:
            return raw, name
    raise FormatError(f"{model_dir}: no quantization_config in config.json and no {LEGACY_CONFIG}")


def canonical_qweight(packed: torch.Tensor, n: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """[K, N/8] interleaved along N -> [N, ceil(K/8)] sequential along K, a block of K rows at a time so that
    the unpacked ints of a large layer never exist all at once."""
    assert rows_per_chunk % 8 == 0  # a block fills whole canonical words
    k = packed.shape[0]
    out = torch.empty(n, -(-k // 8), dtype=torch.int32)
    for k0 in range(0, k, rows_per_chunk):
        q = unpack_cols(packed[k0:k0 + rows_per_chunk], 4, n, AWQ_ORDER)  # [rows, N]
        out[:, k0 // 8:k0 // 8 + -(-q.shape[0] // 8)] = pack_int32(q.t(), 4)
    return out


def _module_shape(prefix: str, leaves: dict, scheme: QuantScheme) -> tuple[int, int]:
    check_leaves(prefix, leaves, "AWQ")
    k, words = leaves["qweight"].shape  # [K, N/8]
    check_groups(prefix, leaves, scheme, "AWQ", k, words * 8, words)
    return k, words * 8


class AWQFormat(CheckpointFormat):
    name = "awq"

    def __init__(self, scheme: QuantScheme, not_convert: list[str], shapes: dict[str, tuple[int, int]],
                 backend: str | None = None):
        super().__init__(backend)
        self.scheme, self.not_convert, self.shapes = scheme, not_convert, shapes

    @classmethod
    def matches(cls, model_dir: str, cfg: ModelConfig) -> bool:
        if cfg.quantization is not None:
            return str(cfg.quantization.get("quant_method", "")).lower() == "awq"
        if os.path.exists(os.path.join(model_dir, LEGACY_CONFIG)):
            return True
        legacy = read_json(os.path.join(model_dir, "quantize_config.json")) or {}
        return str(legacy.get("quant_method", "")).lower() == "awq"

    @classmethod
    def from_checkpoint(cls, model_dir: str, cfg: ModelConfig, backend: str | None = None) -> "AWQFormat":
        scheme, not_convert = parse_config(*_config_source(model_dir, cfg))
        shapes = {}
        for prefix, mod in scan_headers(model_dir).items():
            if "qweight" not in mod.leaves:
                continue
            if matches_any(prefix, not_convert):
                raise FormatError(f"{prefix}.qweight is on disk, but modules_to_not_convert {not_convert} "
                                  "leaves it 16-bit")
            shapes[prefix] = _module_shape(prefix, mod.leaves, scheme)
        return cls(scheme, not_convert, shapes, backend)

    def scheme_for(self, prefix: str) -> QuantScheme | None:
        return self.scheme if prefix in self.shapes else None

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        prefix, _, leaf = name.rpartition(".")
        if prefix not in self.shapes:
            yield name, tensor
            return
        n = self.shapes[prefix][1]
        if leaf == "qweight":
            yield name, canonical_qweight(tensor, n)
        elif leaf == "qzeros":
            yield f"{prefix}.zeros", unpack_cols(tensor, 4, n, AWQ_ORDER).t().contiguous()  # [N, K/G]
        elif leaf == "scales":
            yield name, tensor.t().to(torch.float32).contiguous()  # [K/G, N] -> [N, K/G]
        else:
            yield name, tensor

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "version": "gemm", "bits": 4, "group_size": scheme_group(self.scheme),
                "zero_point": True, "modules_to_not_convert": self.not_convert, "quantized_modules": len(self.shapes),
                "schemes": {self.scheme.describe(): len(self.shapes)}}


# ---- writer ---------------------------------------------------------------------------------------


def _pack_module(prefix: str, mod: QuantizedModule, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    s = mod.scheme
    if s.is_int and (s.weight_dtype != "int4" or s.symmetric or s.act_order):
        raise ValueError(f"{prefix}: AWQ GEMM stores int4 weights with zero points and no act-order; got "
                         f"{s.describe()} (write it as GPTQ, checkpoint_format='gptq_v2')")
    t = canonical_tensors(prefix, mod, "AWQ")
    n, words = t["qweight"].shape  # [N, K/8]
    n_groups = t["scales"].shape[1]
    # K is not stored canonically: whole groups (K = groups * G) or, channel-wise, whole words
    k = n_groups * s.group_size if s.weight_granularity == "group" else words * 8
    if n % 8:
        raise ValueError(f"{prefix}: AWQ packs 8 output columns per int32 word; out-features N={n} is not "
                         "a multiple of 8")
    if -(-k // 8) != words:
        raise ValueError(f"{prefix}: qweight holds {words} words per row, but {n_groups} groups of {s.group_size} "
                         f"give K={k}; AWQ needs K to be a multiple of group_size")
    q = unpack_int32(t["qweight"], 4, k)  # [N, K]
    out = {
        f"{prefix}.qweight": pack_cols(q.t(), 4, AWQ_ORDER),  # [K, N/8]
        f"{prefix}.qzeros": pack_cols(t["zeros"].t(), 4, AWQ_ORDER),  # [K/G, N/8]
        f"{prefix}.scales": exact_cast(t["scales"].t().contiguous(), scale_dtype, f"{prefix}.scales"),  # [K/G, N]
    }
    if "bias" in t:
        out[f"{prefix}.bias"] = t["bias"]
    return out


def save_checkpoint(out_dir: str, config: dict, modules: dict[str, QuantizedModule], plain: dict[str, torch.Tensor],
                    ignore=(), scale_dtype: torch.dtype = torch.float16, max_shard_size: int = 5 * 2**30) -> None:
    """Write an AutoAWQ GEMM checkpoint; `ignore` and 16-bit Linears in blocks go to modules_to_not_convert."""
    groups = sorted(set(scheme_group(m.scheme) for m in modules.values() if m.scheme.is_int))
    if len(groups) > 1:
        raise ValueError(f"AWQ has one group_size per checkpoint; the modules use {groups}")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in modules.items():
        tensors.update(_pack_module(prefix, mod, scale_dtype))
    check_names(modules, plain, tensors, ignore)
    not_convert = sorted(set(ignore) | set(in_block_linears(plain)))
    for name in not_convert:  # AutoAWQ and vLLM match these as substrings of module names
        hit = next((p for p in modules if name in p), None)
        if hit:
            warnings.warn(f"modules_to_not_convert entry {name!r} is a substring of quantized {hit!r}; AutoAWQ/vLLM "
                          "substring matching would load that module as 16-bit")
    qcfg = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": groups[0] if groups else 128,
            "zero_point": True, "modules_to_not_convert": not_convert or None}
    write_checkpoint(out_dir, {**config, "quantization_config": qcfg}, {**tensors, **plain}, max_shard_size)
