"""Model architectures (architecture only), the registry and the loader."""
