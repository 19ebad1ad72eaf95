"""A lowbit model straight from canonical tensors in memory (no checkpoint on disk).

Runs exactly what lowbit serves (the model file, the quant methods, backend selection) on a
quantization result before (or without) writing it in some format: the bench and the tests measure
the quantizer with it, and a format round trip must give the same logits.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from lowbit.config import load_config
from lowbit.formats.base import QuantizedModule
from lowbit.layers.quant_config import QuantConfig
from lowbit.models.loader import build_model, finalize, materialize


class InMemoryQuantConfig(QuantConfig):
    name = "lowbit-in-memory"

    def __init__(self, modules: dict[str, QuantizedModule], backend: str | None = None):
        self.schemes = {p: m.scheme for p, m in modules.items()}
        self.backend = backend

    def linear_method(self, prefix: str, checkpoint_prefixes: Sequence[str]):
        from lowbit.layers.quant_methods import method_for_scheme

        schemes = {self.schemes.get(p) for p in checkpoint_prefixes}
        if len(schemes) > 1:
            raise NotImplementedError(f"{prefix}: the modules fused into it are quantized differently")
        return method_for_scheme(schemes.pop(), self.backend)


class _Format:  # the slice of CheckpointFormat that build_model uses
    def __init__(self, qc: QuantConfig):
        self.quant_config = qc


def _resolve(model: torch.nn.Module, name: str):
    """Checkpoint tensor name -> (module, parameter, shard) through the model's packed-module table."""
    path, _, param = name.rpartition(".")
    parent, _, leaf = path.rpartition(".")
    shard = None
    packed = getattr(model, "packed_modules", {})
    if leaf in packed:
        leaf, shard = packed[leaf]
        path = f"{parent}.{leaf}" if parent else leaf
    return model.get_submodule(path), param, shard


@torch.no_grad()
def build_quantized_model(model_dir: str, modules: dict[str, QuantizedModule], plain: dict[str, torch.Tensor],
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          backend: str | None = None):
    """-> (lowbit model, ModelConfig) with `modules` quantized and `plain` as they are."""
    cfg = load_config(model_dir)
    device = torch.device(device)
    model = build_model(cfg, _Format(InMemoryQuantConfig(modules, backend)), dtype)
    materialize(model, device)
    tensors = dict(plain)
    for prefix, m in modules.items():
        tensors.update({f"{prefix}.{leaf}": t for leaf, t in m.tensors.items()})
    ignored = list(getattr(model, "ignored_checkpoint_keys", ()))
    tied = getattr(model, "lm_head", "absent") is None  # the head is the embedding
    for name, t in tensors.items():
        if any(re.search(p, name) for p in ignored) or (tied and name.startswith("lm_head.")):
            continue
        module, param, shard = _resolve(model, name)
        module.load_weight(param, t, shard)
    finalize(model, device)
    return model.eval(), cfg
