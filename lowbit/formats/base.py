"""What every format reader and writer provides, and the detection that picks a reader.

A reader (`CheckpointFormat` subclass) answers three questions for the loader:
  scheme_for(prefix)     QuantScheme of an on-disk module (e.g. "model.layers.0.self_attn.q_proj"), None = 16-bit
  convert(name, tensor)  on-disk tensor -> canonical (name, tensor) pairs (lowbit/scheme.py layouts)
  describe()             what `lowbit inspect` prints
A writer turns canonical per-module tensors (`QuantizedModule`) back into its on-disk layout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from lowbit.config import ModelConfig
from lowbit.layers.linear import LinearMethod
from lowbit.layers.quant_config import QuantConfig
from lowbit.scheme import QuantScheme


class FormatError(ValueError):
    """A checkpoint whose quantization metadata or tensors do not make sense."""


@dataclass
class QuantizedModule:
    """One on-disk Linear in canonical form: qweight/scales/zeros/g_idx or weight/weight_scale/input_scale
    (+ bias, pre_quant_scale). Single-module shapes: g_idx [K]; per-tensor scales are 0-dim."""

    scheme: QuantScheme
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.exists(os.path.join(model_dir, n))]
        if missing:
            raise FormatError(f"{model_dir}: shards listed in model.safetensors.index.json are missing: {missing}")
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        other = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".gguf"))]
        hint = f" (found {other}; lowbit reads safetensors only)" if other else ""
        raise FormatError(f"{model_dir}: no *.safetensors weights{hint}")
    return [os.path.join(model_dir, f) for f in files]


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """compressed-tensors / vLLM convention: `re:<regex>` (re.match) or an exact name or name suffix."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


class CheckpointFormat:
    """A plain 16/32-bit checkpoint: tensors are used as stored."""

    name = "unquantized"

    def __init__(self, backend: str | None = None):
        self.backend = backend

    @classmethod
    def matches(cls, model_dir: str, cfg: ModelConfig) -> bool:
        return cfg.quantization is None and not os.path.exists(os.path.join(model_dir, "hf_quant_config.json"))

    @classmethod
    def from_checkpoint(cls, model_dir: str, cfg: ModelConfig, backend: str | None = None) -> "CheckpointFormat":
        return cls(backend)

    def scheme_for(self, prefix: str) -> QuantScheme | None:
        return None

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield name, tensor

    def describe(self) -> dict[str, Any]:
        return {"format": self.name}

    @property
    def quant_config(self) -> QuantConfig:
        return FormatQuantConfig(self)


class FormatQuantConfig(QuantConfig):
    def __init__(self, fmt: CheckpointFormat):
        self.fmt = fmt
        self.name = fmt.name

    def linear_method(self, prefix: str, checkpoint_prefixes: Sequence[str]) -> LinearMethod:
        from lowbit.layers.quant_methods import method_for_scheme

        schemes = {p: self.fmt.scheme_for(p) for p in checkpoint_prefixes}
        distinct = set(schemes.values())
        if len(distinct) > 1:
            detail = ", ".join(f"{p}: {s.describe() if s else '16-bit'}" for p, s in schemes.items())
            raise NotImplementedError(f"{prefix}: the modules fused into it are quantized differently ({detail})")
        return method_for_scheme(distinct.pop(), self.fmt.backend)


# readers in detection order; a module that is not there yet is skipped
READERS = (
    "lowbit.formats.compressed_tensors:CompressedTensorsFormat",
    "lowbit.formats.gptq:GPTQFormat",
    "lowbit.formats.awq:AWQFormat",
    "lowbit.formats.fp8:Fp8Format",
    "lowbit.formats.modelopt:ModelOptFormat",
)


def _reader_classes() -> list[type[CheckpointFormat]]:
    import importlib

    classes = []
    for spec in READERS:
        module, _, cls = spec.partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        classes.append(getattr(mod, cls))
    return classes


def detect_format(model_dir: str, cfg: ModelConfig, backend: str | None = None) -> CheckpointFormat:
    if CheckpointFormat.matches(model_dir, cfg):
        return CheckpointFormat(backend)
    for reader in _reader_classes():
        if reader.matches(model_dir, cfg):
            return reader.from_checkpoint(model_dir, cfg, backend)
    qcfg = cfg.quantization or read_json(os.path.join(model_dir, "hf_quant_config.json")) or {}
    method = qcfg.get("quant_method") or qcfg.get("quantization", {}).get("quant_algo")
    raise NotImplementedError(
        f"{model_dir}: unknown quantization (quant_method={method!r}); supported: "
        "gptq, awq (gemm), compressed-tensors, fp8 (block and per-tensor), modelopt (FP8, W4A8_AWQ, MIXED_PRECISION)"
    )


def read_canonical(model_dir: str, fmt: CheckpointFormat) -> tuple[dict[str, QuantizedModule], dict[str, torch.Tensor]]:
    """Every tensor of a checkpoint in canonical form: quantized modules by prefix, the rest by name."""
    from safetensors import safe_open

    modules: dict[str, QuantizedModule] = {}
    plain: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                for name, tensor in fmt.convert(key, f.get_tensor(key)):
                    prefix, _, leaf = name.rpartition(".")
                    scheme = fmt.scheme_for(prefix)
                    if scheme is None:
                        plain[name] = tensor
                    else:
                        modules.setdefault(prefix, QuantizedModule(scheme)).tensors[leaf] = tensor
    return modules, plain
