"""Linear backends. Importing this package registers them in lowbit.layers.selection, in preference
order per kernel family (fast GPU kernels first, `reference` last)."""

from lowbit.layers.backends import reference  # noqa: F401
