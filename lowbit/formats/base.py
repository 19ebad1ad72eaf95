"""What every format reader provides to the loader, and the detection that picks one."""

from __future__ import annotations

import os
from typing import Iterator

import torch

from lowbit.config import ModelConfig
from lowbit.layers.quant_config import UNQUANTIZED, QuantConfig


class CheckpointFormat:
    """A plain 16/32-bit checkpoint: tensors are used as stored."""

    name = "unquantized"

    @property
    def quant_config(self) -> QuantConfig:
        return UNQUANTIZED

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """On-disk tensor -> zero or more canonical (name, tensor) pairs."""
        yield name, tensor


def detect_format(model_dir: str, cfg: ModelConfig) -> CheckpointFormat:
    qcfg = cfg.quantization
    if qcfg is None and not os.path.exists(os.path.join(model_dir, "hf_quant_config.json")):
        return CheckpointFormat()
    method = (qcfg or {}).get("quant_method", "modelopt (hf_quant_config.json)")
    raise NotImplementedError(
        f"{model_dir}: quantized checkpoint (quant_method={method!r}) - quantized formats are not supported yet; "
        "supported: unquantized safetensors"
    )
