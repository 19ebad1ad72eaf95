"""LEAF PACKAGE: Triton kernels and `reference.py` (pure torch, the specification). Imports torch and
triton only. `HAS_TRITON` is False where triton cannot be imported (e.g. macOS); backends check it."""

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False
