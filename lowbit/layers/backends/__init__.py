"""Linear backends. Importing this package registers them in lowbit.layers.selection, in preference
order per kernel family (fast GPU kernels first, `reference` last).

Each GPU backend module registers itself on import; a module that is absent (a trimmed install) is
skipped, while an error inside a present module propagates.
"""

import importlib
import importlib.util

from lowbit.layers.backends import reference  # noqa: F401

# import order = preference order within a family (each registers before `reference`)
_GPU_BACKENDS = ("w4a16_triton", "fp8_triton", "w4a8_triton")

for _name in _GPU_BACKENDS:
    if importlib.util.find_spec(f"lowbit.layers.backends.{_name}") is not None:
        importlib.import_module(f"lowbit.layers.backends.{_name}")
