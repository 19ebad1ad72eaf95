"""Checked parameter copies: every tensor a checkpoint hands us is verified before it lands."""

from __future__ import annotations

import torch


class WeightShapeError(ValueError):
    pass


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if _shape(dst) != _shape(src):
        raise WeightShapeError(f"{what}: checkpoint has shape {_shape(src)}, model expects {_shape(dst)}")
    dst.data.copy_(src)


def copy_rows(dst: torch.Tensor, src: torch.Tensor, offset: int, rows: int, what: str) -> None:
    """Copy `src` into rows [offset, offset + rows) of `dst` (one shard of a fused q/k/v or gate/up)."""
    view = dst.data.narrow(0, offset, rows)
    if _shape(view) != _shape(src):
        raise WeightShapeError(f"{what}: checkpoint has shape {_shape(src)}, model expects {_shape(view)}")
    view.copy_(src)
