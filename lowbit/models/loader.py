"""Build a model on the meta device, materialise it once, stream safetensors shards into it, repack.

Every parameter-owning module has `load_weight(name, tensor, shard)`; a Linear fused from several
checkpoint modules (q/k/v -> qkv_proj) also has `expected_shards()`. The loader checks that every
parameter (and every shard of it) is loaded exactly by the checkpoint: anything missing, unexpected
or mis-shaped is reported by name before the model runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from lowbit.config import ModelConfig, load_config
from lowbit.formats import CheckpointFormat, detect_format
from lowbit.formats.base import FormatError, safetensors_files
from lowbit.layers.weights import WeightShapeError
from lowbit.models.registry import model_class


class CheckpointError(FormatError):
    pass


def materialize(model: nn.Module, device: torch.device) -> None:
    """Replace meta parameters/buffers with uninitialised storage on `device` (shared ones stay shared)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                if id(t) not in made:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
                store[name] = made[id(t)]


@dataclass
class _Target:
    module: nn.Module
    path: str
    param: str
    shard: int | None


class _NameTable:
    """Checkpoint tensor name -> (module, parameter, shard)."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules", {})
        ignored = list(getattr(model, "ignored_checkpoint_keys", ()))
        if getattr(model, "lm_head", "absent") is None:  # tied embeddings: the head is the embedding
            ignored.append(r"^lm_head\.")
        self.ignored = [re.compile(p) for p in ignored]

    def is_ignored(self, name: str) -> bool:
        return any(p.search(name) for p in self.ignored)

    def resolve(self, name: str) -> _Target | None:
        path, _, param = name.rpartition(".")
        shard = None
        parent, _, leaf = path.rpartition(".")
        if leaf in self.packed:
            leaf, shard = self.packed[leaf]
            path = f"{parent}.{leaf}" if parent else leaf
        module = self.modules.get(path)
        if module is None or not hasattr(module, "load_weight"):
            return None
        return _Target(module, path, param, shard)

    def expected(self) -> set[tuple[str, str, int | None]]:
        want = set()
        for path, module in self.modules.items():
            if not hasattr(module, "load_weight"):
                continue
            for pname, _ in module.named_parameters(recurse=False):
                shards = module.expected_shards(pname) if hasattr(module, "expected_shards") else [None]
                want.update((path, pname, s) for s in shards)
        return want


def load_weights(model: nn.Module, model_dir: str, fmt: CheckpointFormat) -> None:
    table = _NameTable(model)
    loaded: set[tuple[str, str, int | None]] = set()
    unexpected: list[str] = []
    files = safetensors_files(model_dir)
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="loading weights",
               disable=None, leave=False)
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if table.is_ignored(key):
                    continue
                for name, tensor in fmt.convert(key, f.get_tensor(key)):
                    target = table.resolve(name)
                    if target is None:
                        unexpected.append(name)
                        continue
                    try:
                        target.module.load_weight(target.param, tensor, target.shard)
                    except (WeightShapeError, AttributeError) as e:
                        raise CheckpointError(f"{os.path.basename(path)}: tensor {key!r}: {e}") from e
                    loaded.add((target.path, target.param, target.shard))
        bar.update(os.path.getsize(path))
    bar.close()
    missing = table.expected() - loaded
    if unexpected or missing:
        lines = []
        if missing:
            shown = sorted(f"{p}.{n}" + (f" (shard {s})" if s is not None else "") for p, n, s in missing)
            lines.append(f"missing tensors ({len(shown)}): {shown[:20]}{' ...' if len(shown) > 20 else ''}")
        if unexpected:
            lines.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise CheckpointError(f"{model_dir}: checkpoint does not match {type(model).__name__}: " + "; ".join(lines))


def build_model(cfg: ModelConfig, fmt: CheckpointFormat, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        return model_class(cfg.architecture)(cfg, fmt.quant_config, dtype)


def finalize(model: nn.Module, device: torch.device) -> None:
    """After the weights are in: repack quantized layers once, build rotary tables."""
    for module in model.modules():
        if hasattr(module, "process_after_loading"):
            module.process_after_loading()
        if hasattr(module, "materialize"):
            module.materialize(device)


def load_model(model_dir: str, device: torch.device, dtype: torch.dtype,
               backend: str | None = None) -> tuple[nn.Module, ModelConfig]:
    cfg = load_config(model_dir)
    fmt = detect_format(model_dir, cfg, backend)
    model = build_model(cfg, fmt, dtype)
    materialize(model, device)
    load_weights(model, model_dir, fmt)
    finalize(model, device)
    return model.eval(), cfg
