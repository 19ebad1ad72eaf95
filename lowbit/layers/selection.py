"""Backend selection: per kernel family an ordered list of backends; the first that can, wins.

Each backend answers `can_implement(scheme, shape, device, dtype) -> (ok, reason)`. The order for GPUs
comes from bench/ results. `LOWBIT_BACKEND=name` (or `--backend name`, passed down by constructor)
forces one backend for every layer it can serve; when nothing can, the error lists every reason.
The `reference` backend (dequantize + torch matmul) serves every scheme on every device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from lowbit.scheme import QuantScheme


@dataclass(frozen=True)
class LayerShape:
    n: int
    k: int
    shard_sizes: tuple[int, ...]


class LinearBackend(Protocol):
    name: str
    families: tuple[str, ...]  # QuantScheme.name values it serves
    min_capability: tuple[int, int] | None  # None: runs on the CPU too

    def can_implement(self, scheme: QuantScheme, shape: LayerShape, device: torch.device,
                      dtype: torch.dtype) -> tuple[bool, str]: ...

    def prepare(self, layer) -> None: ...  # repack the canonical tensors once

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


_REGISTRY: dict[str, list[LinearBackend]] = {}


def register(backend: LinearBackend, position: int | None = None) -> LinearBackend:
    """Add a backend to the ordered list of every family it serves (default: before `reference`)."""
    for fam in backend.families:
        lst = _REGISTRY.setdefault(fam, [])
        if any(b.name == backend.name for b in lst):
            continue
        if position is None:
            position = next((i for i, b in enumerate(lst) if b.name == "reference"), len(lst))
        lst.insert(min(position, len(lst)), backend)
    return backend


def backends_for(family: str) -> list[LinearBackend]:
    _load_builtin()
    return list(_REGISTRY.get(family, []))


def capability_ok(backend: LinearBackend, device: torch.device) -> tuple[bool, str]:
    if backend.min_capability is None:
        return True, ""
    if device.type != "cuda":
        return False, f"needs a CUDA GPU (sm{backend.min_capability[0]}{backend.min_capability[1]}+), device is {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < backend.min_capability:
        need = "".join(map(str, backend.min_capability))
        return False, f"needs sm{need}+, this GPU is sm{cap[0]}{cap[1]}"
    return True, ""


def select_backend(scheme: QuantScheme, shape: LayerShape, device: torch.device, dtype: torch.dtype,
                   override: str | None = None, what: str = "", prepare=None) -> LinearBackend:
    """First backend that can implement the layer; with `prepare(backend)`, also the first whose
    preparation (the repack) succeeds — a backend may decline there with NotImplementedError."""
    override = override or os.environ.get("LOWBIT_BACKEND") or None
    candidates = backends_for(scheme.name)
    if override:
        named = [b for b in candidates if b.name == override]
        if not named:
            raise NotImplementedError(
                f"{what}: backend {override!r} does not serve {scheme.name}; "
                f"backends for {scheme.name}: {[b.name for b in candidates]}"
            )
        candidates = named
    reasons = []
    for backend in candidates:
        ok, reason = capability_ok(backend, device)
        if ok:
            ok, reason = backend.can_implement(scheme, shape, device, dtype)
        if ok and prepare is not None:
            try:
                prepare(backend)
            except NotImplementedError as e:
                ok, reason = False, str(e)
        if ok:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise NotImplementedError(
        f"{what}: no backend can run {scheme.describe()} for N={shape.n}, K={shape.k} on {device} ({dtype}); "
        + "; ".join(reasons)
    )


_LOADED = False


def _load_builtin() -> None:
    """Import the modules that register backends (kept lazy so kernels load only when used)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from lowbit.layers import backends  # noqa: F401  (registers on import)
