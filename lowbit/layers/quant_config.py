"""The hook through which a checkpoint's quantization reaches the layers.

A model asks, while it is built, `quant.linear_method(prefix, checkpoint_prefixes)` for each Linear;
`checkpoint_prefixes` are the on-disk module names fused into it (q/k/v_proj for qkv_proj), so a
format can apply its ignore lists and per-module overrides by the names users know.
"""

from __future__ import annotations

from typing import Sequence

from lowbit.layers.linear import LinearMethod, UnquantizedLinearMethod


class QuantConfig:
    name = "none"

    def linear_method(self, prefix: str, checkpoint_prefixes: Sequence[str]) -> LinearMethod:
        return UnquantizedLinearMethod()


UNQUANTIZED = QuantConfig()
