"""On-disk checkpoint formats: recognise one, name its tensors, convert them to canonical layouts."""

from lowbit.formats.base import CheckpointFormat, detect_format

__all__ = ["CheckpointFormat", "detect_format"]
