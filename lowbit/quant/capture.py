"""Calibration-time forward passes over a transformers model, one decoder layer at a time.

  first_layer_inputs: run the embedding (and anything before layer 0) per mini-batch; a hook on
      layer 0 keeps its hidden states [B, T, H] and keyword inputs (position embeddings, mask) and
      stops the forward there.
  linear_groups: which nn.Linear of a layer read the same input tensor (q/k/v, gate/up), in call order.
  InputStats: what the quantizers need of a group's input X [T, K], accumulated in float32 by a hook
      (X itself is never kept): H = X^T X [K, K], mean |X| [K], max |X| [K], token count.
Only one layer's inputs are held at a time, so an 8B model calibrates on one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward is skipped."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (`model.model.layers` for Llama/Qwen and most others)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise NotImplementedError(f"{type(model).__name__}: found no list of {n} decoder layers to calibrate layer by layer")


@dataclass
class LayerInput:
    hidden: torch.Tensor  # [B, T, H]
    kwargs: dict


@torch.no_grad()
def first_layer_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int, device,
                       progress: bool = False) -> list[LayerInput]:
    layers = decoder_layers(model)
    captured: list[LayerInput] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append(LayerInput(hidden, kw))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        from tqdm.auto import tqdm

        for i in tqdm(range(0, samples.shape[0], batch_size), desc="calibration", disable=not progress, leave=False):
            try:
                model(input_ids=samples[i:i + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """The layer's outputs as the next layer's inputs (same keyword inputs)."""
    return [LayerInput(layer_output(layer(x.hidden, **x.kwargs)), x.kwargs) for x in inputs]


@torch.no_grad()
def run_until_stop(layer: nn.Module, inputs: list[LayerInput]) -> None:
    for x in inputs:
        try:
            layer(x.hidden, **x.kwargs)
        except StopForward:
            pass


@torch.no_grad()
def linear_groups(layer: nn.Module, sample: LayerInput) -> list[list[str]]:
    """Names (relative to the layer) of its nn.Linear modules, grouped by shared input, in call order."""
    calls: list[tuple[str, int]] = []
    names = {m: n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append((names[mod], id(args[0]))))
               for m in names]
    keep = []  # hold the inputs alive so their ids stay unique during the pass
    handles += [m.register_forward_pre_hook(lambda mod, args: keep.append(args[0])) for m in names]
    try:
        layer(sample.hidden[:1], **_first_row(sample.kwargs))
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, key in calls:
        if name not in groups.setdefault(key, []):
            groups[key].append(name)
    return list(groups.values())


def _first_row(kwargs: dict) -> dict:
    """Keyword inputs for a batch of one (masks and position tensors have a batch dim, or broadcast)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            out[k] = v[:1]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[:1] if t.dim() > 0 and t.shape[0] > 1 else t for t in v)
        else:
            out[k] = v
    return out


@dataclass
class InputStats:
    """Sufficient statistics of one group's input X [T, K] (float32, on X's device)."""

    want_hessian: bool = True
    hessian: torch.Tensor | None = None  # [K, K] sum of x x^T
    abs_sum: torch.Tensor | None = None  # [K]
    amax: torch.Tensor | None = None  # [K]
    count: int = 0
    extra: dict = field(default_factory=dict)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.amax is None:
            k = x.shape[1]
            self.abs_sum = torch.zeros(k, device=x.device)
            self.amax = torch.zeros(k, device=x.device)
            if self.want_hessian:
                self.hessian = torch.zeros(k, k, device=x.device)
        if self.want_hessian:
            self.hessian.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        self.amax = torch.maximum(self.amax, x.abs().amax(0))
        self.count += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def rescale(self, s: torch.Tensor) -> None:
        """The statistics of X / s (after smoothing s was folded into the producer of X)."""
        if self.hessian is not None:
            self.hessian = self.hessian / s[:, None] / s[None, :]
        self.abs_sum = self.abs_sum / s
        self.amax = self.amax / s


def collect(module: nn.Module, stats: InputStats, stop: bool):
    """Hook `module` so its input feeds `stats` (and the forward stops there when `stop`)."""
    def hook(mod, args):
        stats.update(args[0])
        if stop:
            raise StopForward

    return module.register_forward_pre_hook(hook)
