"""Write a QuantResult through a format writer (lowbit/formats/*.py), with the tokenizer beside it.

Writers are `save_checkpoint(out_dir, config, modules, plain, ignore=())`; they are imported only
when their format is asked for. The source model's tokenizer, chat template and generation config
are copied; its weights, config and any quantization metadata are not.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil

from lowbit.quant.pipeline import QuantResult
from lowbit.quant.recipes import FORMATS

_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".msgpack", ".h5")
_NOT_COPIED_NAMES = ("config.json", "hf_quant_config.json", "recipe.yaml", "quantization_report.json")


def writer_for(fmt: str):
    module = FORMATS[fmt][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise NotImplementedError(f"format {fmt!r}: its writer ({module}) is not in this build of lowbit; "
                                  f"available: {', '.join(available_formats()) or 'none'}") from e
    return mod.save_checkpoint


def available_formats() -> list[str]:
    out = []
    for fmt, (module, _) in FORMATS.items():
        try:
            if hasattr(importlib.import_module(module), "save_checkpoint"):
                out.append(fmt)
        except ModuleNotFoundError:
            pass
    return out


def source_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    return config


def copy_side_files(model_dir: str, out_dir: str) -> list[str]:
    """Tokenizer files, chat template, generation_config.json: everything but weights and config."""
    copied = []
    for name in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, name)
        if not os.path.isfile(src) or name.startswith(".") or name in _NOT_COPIED_NAMES or name.endswith(_NOT_COPIED):
            continue
        shutil.copyfile(src, os.path.join(out_dir, name))
        copied.append(name)
    return copied


def weights_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def save_result(result: QuantResult, model_dir: str, out_dir: str, fmt: str, report: dict | None = None,
                progress: bool = False) -> None:
    from tqdm.auto import tqdm

    writer = writer_for(fmt)
    os.makedirs(out_dir, exist_ok=True)
    with tqdm(total=2, desc=f"saving ({fmt})", disable=not progress, leave=False) as bar:
        writer(out_dir, source_config(model_dir), result.modules, result.plain, ignore=tuple(result.ignore))
        bar.update()
        copy_side_files(model_dir, out_dir)
        bar.update()
    if report is not None:
        with open(os.path.join(out_dir, "quantization_report.json"), "w") as f:
            json.dump(report, f, indent=1)
