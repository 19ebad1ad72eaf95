"""lowbit: an inference engine for quantized LLMs."""

__version__ = "0.1.0"

from lowbit.engine.sampling_params import SamplingParams  # noqa: E402
from lowbit.engine.llm import LLM, RequestOutput  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]
