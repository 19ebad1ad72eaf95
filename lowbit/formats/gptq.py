"""GPTQ checkpoints: AutoGPTQ v1 ("gptq", zero-1 on disk) and GPTQModel "gptq_v2" (true zero). Read and write.

On disk, per quantized Linear `<prefix>.` (b bits, P = 32 // b, G group, -1 = one group of K; formats.md §1):

| tensor    | dtype      | shape             | layout                                                        |
|-----------|------------|-------------------|---------------------------------------------------------------|
| `qweight` | int32      | [K/P, N]          | packed along K: row k in word k//P at bits b*(k%P)             |
| `qzeros`  | int32      | [ceil(K/G), N/P]  | packed along N, same order; v1 stores zero-1, v2 the zero      |
| `scales`  | fp16       | [ceil(K/G), N]    | W[k, n] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k] |
| `g_idx`   | int32      | [K]               | always written; k // G unless act-order (desc_act)            |
| `bias`    | model dtype| [N]               | optional                                                      |

In memory (canonical, lowbit/scheme.py):

| tensor    | dtype   | shape            | from disk                                                     |
|-----------|---------|------------------|---------------------------------------------------------------|
| `qweight` | int32   | [N, K/P]         | qweight.T: the very same words (both pack along K, LSB-first) |
| `scales`  | float32 | [N, ceil(K/G)]   | scales.T                                                      |
| `zeros`   | int32   | [N, ceil(K/G)]   | asymmetric only: unpacked qzeros.T (+1 for v1)                |
| `g_idx`   | int32   | [K]              | act-order only (a g_idx equal to k // G is dropped)           |

Which modules are quantized: the tensors decide (a `.qweight` on disk), the config says how (`dynamic`
per-module overrides, GPTQModel/vLLM first-match-wins). A module with a qweight that the config calls 16-bit
(`-:` dynamic rule, absent from `modules_in_block_to_quantize`, `lm_head: false`) is a contradiction and fails.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from lowbit.config import ModelConfig
from lowbit.formats.base import CheckpointFormat, FormatError, QuantizedModule, read_json
from lowbit.formats.int_packing import (canonical_tensors, check_groups, check_leaves, check_names, exact_cast,
                                        in_block_linears, int_scheme, pack_cols, read_tensors, scan_headers,
                                        scheme_group, unpack_cols, write_checkpoint)
from lowbit.scheme import QuantScheme

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
LEGACY_CONFIG = "quantize_config.json"  # AutoGPTQ, beside a config.json without quantization_config


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str
    lm_head: bool
    dynamic: tuple[tuple[str, bool, dict], ...]  # (regex, skip, overrides) in file order
    modules_in_block: tuple[str, ...] | None  # block-relative names, matched as substrings (vLLM)

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str) -> "GPTQConfig":
        method = str(raw.get("quant_method", "gptq")).lower()
        fmt = str(raw.get("checkpoint_format") or raw.get("format") or
                  ("marlin" if raw.get("is_marlin_format") or method == "marlin" else "gptq")).lower()
        if method not in ("gptq", "marlin"):
            raise FormatError(f"{where}: quant_method {method!r} is not GPTQ; supported: gptq")
        if fmt not in CHECKPOINT_FORMATS:
            raise NotImplementedError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; "
                                      f"supported: {CHECKPOINT_FORMATS}")
        if str(raw.get("pack_dtype", "int32")) != "int32":
            raise NotImplementedError(f"{where}: GPTQ pack_dtype {raw['pack_dtype']!r} is not supported; "
                                      "supported: int32")
        if "bits" not in raw and "w_bit" not in raw:
            raise FormatError(f"{where}: GPTQ config has no `bits`")
        dynamic = []
        for key, value in (raw.get("dynamic") or {}).items():
            skip = key.startswith("-:")
            pattern = key[2:] if key.startswith(("-:", "+:")) else key
            try:
                re.compile(pattern)
            except re.error as e:
                raise FormatError(f"{where}: dynamic rule {key!r} is not a valid regex ({e})") from e
            dynamic.append((pattern, skip, dict(value or {})))
        blocks = raw.get("modules_in_block_to_quantize")
        flat = tuple(n for item in blocks for n in ([item] if isinstance(item, str) else item)) if blocks else None
        qc = cls(bits=raw.get("bits", raw.get("w_bit")), group_size=raw.get("group_size", raw.get("q_group_size", 128)),
                 sym=bool(raw.get("sym", True)), desc_act=bool(raw.get("desc_act", False)), checkpoint_format=fmt,
                 lm_head=bool(raw.get("lm_head", False)), dynamic=tuple(dynamic), modules_in_block=flat)
        int_scheme(qc.bits, qc.group_size, qc.sym, False, f"{where} (GPTQ)")  # bits / group_size errors up front
        return qc

    def module_settings(self, prefix: str) -> tuple[dict | None, str]:
        """(bits/group_size/sym/desc_act of `prefix`, or None with the reason it stays 16-bit)."""
        is_head = prefix.rpartition(".")[2] == "lm_head"
        if is_head and not self.lm_head:
            return None, "lm_head is false"
        if not is_head and self.modules_in_block and not any(m in prefix for m in self.modules_in_block):
            return None, f"not in modules_in_block_to_quantize {list(self.modules_in_block)}"
        out = dict(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act)
        for pattern, skip, overrides in self.dynamic:
            if re.match(pattern, prefix):
                if skip:
                    return None, f"dynamic rule '-:{pattern}' skips it"
                out.update({k: v for k, v in overrides.items() if k in out})
                break
        return out, ""


def _config_source(model_dir: str, cfg: ModelConfig) -> tuple[dict, str]:
    if cfg.quantization is not None:
        return cfg.quantization, "config.json quantization_config"
    raw = read_json(os.path.join(model_dir, LEGACY_CONFIG))
    if raw is None:
        raise FormatError(f"{model_dir}: no quantization_config in config.json and no {LEGACY_CONFIG}")
    return raw, LEGACY_CONFIG


def _module_shape(prefix: str, leaves: dict, scheme: QuantScheme) -> tuple[int, int]:
    """(K, N) of a module from its header shapes; every inconsistency names the tensor."""
    check_leaves(prefix, leaves, "GPTQ")
    per = scheme.pack_factor
    rows, n = leaves["qweight"].shape  # [K/P, N]
    k = rows * per
    if "g_idx" in leaves:  # the exact K, also when K is not a multiple of P
        gi = leaves["g_idx"]
        if len(gi.shape) != 1 or gi.dtype not in ("I32", "I64", "I16"):
            raise FormatError(f"{prefix}.g_idx: {gi.dtype} {list(gi.shape)} is not a 1-D int tensor [K]")
        k = gi.shape[0]
        if rows != math.ceil(k / per):
            raise FormatError(f"{prefix}.qweight has {rows} rows, but K={k} (from {prefix}.g_idx) at {scheme.bits} "
                              f"bits packs into {math.ceil(k / per)} rows of [K/{per}, N]")
    check_groups(prefix, leaves, scheme, "GPTQ", k, n, math.ceil(n / per))
    return k, n


class GPTQFormat(CheckpointFormat):
    name = "gptq"

    def __init__(self, qc: GPTQConfig, schemes: dict[str, QuantScheme], shapes: dict[str, tuple[int, int]],
                 backend: str | None = None):
        super().__init__(backend)
        self.qc, self.schemes, self.shapes = qc, schemes, shapes

    @classmethod
    def matches(cls, model_dir: str, cfg: ModelConfig) -> bool:
        if cfg.quantization is not None:
            return str(cfg.quantization.get("quant_method", "")).lower() == "gptq"
        legacy = read_json(os.path.join(model_dir, LEGACY_CONFIG))
        return legacy is not None and str(legacy.get("quant_method", "gptq")).lower() != "awq"

    @classmethod
    def from_checkpoint(cls, model_dir: str, cfg: ModelConfig, backend: str | None = None) -> "GPTQFormat":
        qc = GPTQConfig.parse(*_config_source(model_dir, cfg))
        index = scan_headers(model_dir)
        base, shapes = {}, {}
        for prefix, mod in index.items():
            if "qweight" not in mod.leaves:
                continue
            settings, why = qc.module_settings(prefix)
            if settings is None:
                raise FormatError(f"{prefix}.qweight is on disk, but the GPTQ config leaves {prefix} 16-bit ({why})")
            base[prefix] = int_scheme(settings["bits"], settings["group_size"], settings["sym"], False, prefix)
            shapes[prefix] = _module_shape(prefix, mod.leaves, base[prefix])
        # act-order per module from the actual g_idx: a trivial k // G (static_groups, GAR, no desc_act) is dropped
        g_idx = read_tensors({f"{p}.g_idx": index[p].leaves["g_idx"] for p in base if "g_idx" in index[p].leaves})
        act = {}
        for p, s in base.items():
            g = g_idx.get(f"{p}.g_idx")
            k = shapes[p][0]
            if g is None:
                act[p] = False
                continue
            n_groups = k // s.effective_group(k)
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_groups):
                raise FormatError(f"{p}.g_idx holds groups {int(g.min())}..{int(g.max())}; {p}.scales has {n_groups}")
            act[p] = not torch.equal(g.long(), torch.arange(k) // s.effective_group(k))
        # modules that may be fused (same parent, same input width, same scheme) must agree: keep every g_idx
        siblings: dict[tuple, list[str]] = {}
        for p, s in base.items():
            siblings.setdefault((p.rpartition(".")[0], shapes[p][0], s), []).append(p)
        for members in siblings.values():
            if any(act[p] for p in members):
                act.update({p: True for p in members if f"{p}.g_idx" in g_idx})
        schemes = {p: int_scheme(s.bits, scheme_group(s), s.symmetric, act[p], p) for p, s in base.items()}
        return cls(qc, schemes, shapes, backend)

    def scheme_for(self, prefix: str) -> QuantScheme | None:
        return self.schemes.get(prefix)

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        prefix, _, leaf = name.rpartition(".")
        scheme = self.schemes.get(prefix)
        if scheme is None:
            yield name, tensor
        elif leaf == "qweight":
            yield name, tensor.t().contiguous()  # [K/P, N] -> [N, K/P], words unchanged
        elif leaf == "scales":
            yield name, tensor.t().to(torch.float32).contiguous()  # [K/G, N] -> [N, K/G]
        elif leaf == "qzeros":
            zeros = self._zeros(name, tensor, scheme)
            if zeros is not None:
                yield f"{prefix}.zeros", zeros
        elif leaf == "g_idx":
            if scheme.act_order:
                yield name, tensor.to(torch.int32)
        else:
            yield name, tensor

    def _zeros(self, name: str, packed: torch.Tensor, scheme: QuantScheme) -> torch.Tensor | None:
        b, (_, n) = scheme.bits, self.shapes[name.rpartition(".")[0]]
        v1 = self.qc.checkpoint_format == "gptq"
        z = unpack_cols(packed, b, n) + (1 if v1 else 0)  # [K/G, N] true zeros (AutoGPTQ adds 1 unmasked)
        if scheme.symmetric:
            want = 2 ** (b - 1)
            if not bool((z == want).all()):
                found = sorted(set((z[z != want] - (1 if v1 else 0)).tolist()))[:8]
                raise FormatError(f"{name}: a symmetric {self.qc.checkpoint_format} checkpoint stores every zero as "
                                  f"{want - (1 if v1 else 0)} (true zero {want}); found {found}")
            return None
        overflow = int((z >= 2**b).sum())
        if overflow:
            warnings.warn(f"{name}: {overflow} zero points read as {2**b}: the GPTQ v1 zero-1 overflow (a true zero of "
                          "0 stored as -1); kept as AutoGPTQ computes them, re-export as gptq_v2 to avoid it")
        return z.t().contiguous()  # [N, K/G]

    def describe(self) -> dict[str, Any]:
        qc = self.qc
        return {"format": self.name, "checkpoint_format": qc.checkpoint_format, "bits": qc.bits,
                "group_size": qc.group_size, "sym": qc.sym, "desc_act": qc.desc_act, "lm_head": qc.lm_head,
                "dynamic_rules": len(qc.dynamic), "quantized_modules": len(self.schemes),
                "schemes": dict(Counter(s.describe() for s in self.schemes.values()))}


# ---- writer ---------------------------------------------------------------------------------------


def _pack_module(prefix: str, mod: QuantizedModule, v1: bool, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    s, t = mod.scheme, canonical_tensors(prefix, mod, "GPTQ")
    b, per = s.bits, s.pack_factor
    n, words = t["qweight"].shape  # [N, K/P]
    k = t["g_idx"].numel() if s.act_order else words * per  # K itself is not stored canonically
    if k % per or words != k // per:
        raise ValueError(f"{prefix}: GPTQ packs whole int32 words along K; in-features K={k} must be a multiple "
                         f"of {per}")
    g = s.effective_group(k)
    if k % g or tuple(t["scales"].shape) != (n, k // g):
        raise ValueError(f"{prefix}.scales has shape {list(t['scales'].shape)}; K={k}, N={n}, group_size {g} need "
                         f"[{n}, {k // g}] (GPTQ stores whole groups)")
    zeros = torch.full((n, k // g), 2 ** (b - 1), dtype=torch.int32) if s.symmetric else t["zeros"]
    if v1 and bool((zeros == 0).any()):
        raise ValueError(f"{prefix}.zeros: a zero point of 0 cannot be written as GPTQ v1, which stores zero-1 "
                         f"(-1 overflows into the neighbouring {b}-bit fields); use checkpoint_format='gptq_v2'")
    g_idx = t["g_idx"] if s.act_order else torch.arange(k) // g
    out = {
        f"{prefix}.qweight": t["qweight"].to(torch.int32).t().contiguous(),  # [K/P, N]: the same words
        f"{prefix}.qzeros": pack_cols((zeros - (1 if v1 else 0)).t(), b),  # [K/G, N/P]
        f"{prefix}.scales": exact_cast(t["scales"].t().contiguous(), scale_dtype, f"{prefix}.scales"),  # [K/G, N]
        f"{prefix}.g_idx": g_idx.to(torch.int32),  # [K]; AutoGPTQ always saves it
    }
    if "bias" in t:
        out[f"{prefix}.bias"] = t["bias"]
    return out


def save_checkpoint(out_dir: str, config: dict, modules: dict[str, QuantizedModule], plain: dict[str, torch.Tensor],
                    ignore=(), checkpoint_format: str = "gptq", scale_dtype: torch.dtype = torch.float16,
                    max_shard_size: int = 5 * 2**30) -> None:
    """Write an AutoGPTQ-layout checkpoint (v1 "gptq", or "gptq_v2"). Modules unlike the most common scheme get
    GPTQModel `dynamic` overrides; `ignore` and 16-bit Linears in blocks get `-:` skip rules (vLLM honours both)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                         f"supported: {CHECKPOINT_FORMATS}")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in modules.items():
        tensors.update(_pack_module(prefix, mod, checkpoint_format == "gptq", scale_dtype))
    check_names(modules, plain, tensors, ignore)
    keyed = {p: (m.scheme.bits, scheme_group(m.scheme), m.scheme.symmetric) for p, m in modules.items()}
    bits, group, sym = Counter(keyed.values()).most_common(1)[0][0] if keyed else (4, 128, True)
    dynamic: dict[str, dict] = {f"+:^{re.escape(p)}$": {"bits": k[0], "group_size": k[1], "sym": k[2]}
                                for p, k in keyed.items() if k != (bits, group, sym)}
    dynamic.update({f"-:^{re.escape(p)}$": {} for p in sorted(set(ignore) | set(in_block_linears(plain)))})
    qcfg = {"quant_method": "gptq", "checkpoint_format": checkpoint_format, "bits": bits, "group_size": group,
            "sym": sym, "desc_act": any(m.scheme.act_order for m in modules.values()),
            "lm_head": "lm_head" in modules, "static_groups": False, "true_sequential": True, "pack_dtype": "int32"}
    if dynamic:
        qcfg["dynamic"] = dynamic
    write_checkpoint(out_dir, {**config, "quantization_config": qcfg}, {**tensors, **plain}, max_shard_size)
