"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from torch import nn

from lowbit.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

# families whose configs parse today and whose model files are still to come
PLANNED = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def model_class(architecture: str) -> type[nn.Module]:
    if architecture in MODEL_REGISTRY:
        return MODEL_REGISTRY[architecture]
    note = " (planned, not implemented yet)" if architecture in PLANNED else ""
    raise NotImplementedError(
        f"architecture {architecture!r}{note} is not supported; supported: {sorted(MODEL_REGISTRY)}"
    )
