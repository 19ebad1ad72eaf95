"""Write canonical modules as a compressed-tensors checkpoint: lowbit's default export format.

The tensors, dtypes and `quantization_config` are those llm-compressor writes for the same scheme, so vLLM,
SGLang and transformers (compressed-tensors' own loader) read the output. Canonical -> disk:

| scheme                   | canonical (lowbit/scheme.py)              | on disk                                         |
|--------------------------|-------------------------------------------|-------------------------------------------------|
| int4/int8 (any act)      | qweight [N, K/P] int32                    | `weight_packed` (same words), `weight_shape` [N, K] int64 |
|                          | scales [N, ceil(K/G)] float32             | `weight_scale` [N, ceil(K/G)] (channel: [N, 1]) |
|                          | zeros [N, ceil(K/G)] int32 (asym)         | `weight_zero_point` [ceil(N/P), ceil(K/G)] int32, packed along N |
|                          | g_idx [K] (act-order)                     | `weight_g_idx` [K] int32, actorder "group"      |
| fp8 e4m3                 | weight [N, K], weight_scale [] / [N] / grid | `weight`, `weight_scale` [1] / [N, 1] / grid  |
| fp8 activations, static  | input_scale []                            | `input_scale` [1]                               |

Scale dtype: llm-compressor stores scales in the model dtype. A scale tensor is written in the config's
dtype (bf16/fp16) when that cast is exact (lowbit's quantizers round scales to it) and in float32 otherwise,
which compressed-tensors, vLLM and transformers accept (they cast on load); either way the read-back is
bit-identical.

Targets: one scheme -> `["Linear"]` with every 16-bit Linear (and lm_head) in `ignore`, as llm-compressor
writes it; several schemes -> each group lists its module names exactly, because vLLM matches a class target
before the names of the shards of a fused q/k/v, which would give them the wrong group.
"""

from __future__ import annotations

import math
import warnings

import torch

from lowbit.formats.base import QuantizedModule
from lowbit.formats.compressed_tensors_config import scheme_args
from lowbit.formats.int_packing import write_checkpoint
from lowbit.kernels.reference import pack_int32
from lowbit.scheme import QuantScheme

CT_VERSION = "0.19.0"  # the compressed-tensors release whose layout and config this writer follows
_MODEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _scale(t: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """The model dtype when exact (llm-compressor's choice), else float32: the read-back stays bit-identical."""
    t = t.to(torch.float32)
    cast = t.to(model_dtype)
    return cast if torch.equal(cast.to(torch.float32), t) else t


def _expect(prefix: str, t: dict, scheme: QuantScheme, required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(t))
    extra = sorted(set(t) - required - optional)
    if missing or extra:
        raise ValueError(f"{prefix}: canonical {scheme.describe()} needs {sorted(required)} (+ {sorted(optional)}); "
                         f"missing {missing}, unexpected {extra}")


def _int_tensors(prefix: str, mod: QuantizedModule, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    s, t = mod.scheme, mod.tensors
    required = {"qweight", "scales"} | ({"g_idx"} if s.act_order else set()) | (set() if s.symmetric else {"zeros"})
    _expect(prefix, t, s, required | ({"input_scale"} if s.static_input_scale else set()), {"bias"})
    n, words = t["qweight"].shape
    # canonical modules do not carry K: act-order has it in g_idx, else it must fill the int32 words
    k = t["g_idx"].numel() if s.act_order else words * s.pack_factor
    if words != math.ceil(k / s.pack_factor):
        raise ValueError(f"{prefix}: qweight has {words} words per row but g_idx gives K={k}")
    g = s.effective_group(k)
    if k > g and k % g:
        raise ValueError(f"{prefix}: group_size {g} does not divide in-features K={k}; compressed-tensors needs K % G == 0")
    ng = math.ceil(k / g)
    if tuple(t["scales"].shape) != (n, ng):
        raise ValueError(f"{prefix}.scales has shape {list(t['scales'].shape)}; N={n}, K={k}, G={g} need [{n}, {ng}]")
    out = {f"{prefix}.weight_packed": t["qweight"].to(torch.int32).contiguous(),
           f"{prefix}.weight_scale": _scale(t["scales"], model_dtype),
           f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not s.symmetric:
        z = t["zeros"].to(torch.int32)
        if tuple(z.shape) != (n, ng) or int(z.min()) < 0 or int(z.max()) >= 2**s.bits:
            raise ValueError(f"{prefix}.zeros must be [{n}, {ng}] ints in [0, {2**s.bits}), got {list(z.shape)}")
        # unsigned canonical zero = signed zp + 2^(b-1): exactly the value compressed-tensors packs, along N
        out[f"{prefix}.weight_zero_point"] = pack_int32(z.t(), s.bits).t().contiguous()
    if s.act_order:
        out[f"{prefix}.weight_g_idx"] = t["g_idx"].to(torch.int32).reshape(k)
    return out


def _fp8_tensors(prefix: str, mod: QuantizedModule, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    s, t = mod.scheme, mod.tensors
    _expect(prefix, t, s, {"weight", "weight_scale"} | ({"input_scale"} if s.static_input_scale else set()), {"bias"})
    w = t["weight"]
    if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
        raise ValueError(f"{prefix}.weight must be a 2-D float8_e4m3fn tensor, got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    ws = t["weight_scale"]
    if s.weight_granularity == "tensor":
        want, disk = (), (1,)
    elif s.weight_granularity == "channel":
        want, disk = (n,), (n, 1)
    else:
        want = disk = (math.ceil(n / s.block_size[0]), math.ceil(k / s.block_size[1]))
    if tuple(ws.shape) != want:
        raise ValueError(f"{prefix}.weight_scale has shape {list(ws.shape)}; {s.describe()} with N={n}, K={k} "
                         f"needs {list(want)}")
    return {f"{prefix}.weight": w.contiguous(), f"{prefix}.weight_scale": _scale(ws.reshape(disk), model_dtype)}


def module_tensors(prefix: str, mod: QuantizedModule, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    s = mod.scheme
    scheme_args(s)  # refuses what compressed-tensors cannot express (pre_quant_scale, ue8m0)
    out = _int_tensors(prefix, mod, model_dtype) if s.is_int else _fp8_tensors(prefix, mod, model_dtype)
    if s.static_input_scale:
        if mod.tensors["input_scale"].numel() != 1:
            raise ValueError(f"{prefix}.input_scale must hold one value, got {list(mod.tensors['input_scale'].shape)}")
        out[f"{prefix}.input_scale"] = _scale(mod.tensors["input_scale"].reshape(1), model_dtype)
    if "bias" in mod.tensors:
        out[f"{prefix}.bias"] = mod.tensors["bias"]
    return out


def quantization_config(modules: dict[str, QuantizedModule], ignore: list[str]) -> dict:
    by_scheme: dict[QuantScheme, list[str]] = {}
    for prefix, mod in modules.items():
        by_scheme.setdefault(mod.scheme, []).append(prefix)
    groups, formats = {}, set()
    for i, (scheme, prefixes) in enumerate(by_scheme.items()):
        w, a, fmt = scheme_args(scheme)
        formats.add(fmt)
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(by_scheme) == 1 else sorted(prefixes), "weights": w,
                                "input_activations": a, "output_activations": None, "format": fmt}
    return {"config_groups": groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


def save_checkpoint(out_dir: str, config: dict, modules: dict[str, QuantizedModule], plain: dict[str, torch.Tensor],
                    ignore=(), max_shard_size: int = 5 * 2**30) -> None:
    """config.json (+ quantization_config) and safetensors shards (+ index when more than one)."""
    if not modules:
        raise ValueError("no quantized modules to write; a 16-bit model needs no compressed-tensors config")
    both = sorted(set(ignore) & set(modules))
    if both:
        raise ValueError(f"modules {both} are both quantized and listed in ignore")
    model_dtype = _MODEL_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in modules.items():
        tensors.update(module_tensors(prefix, mod, model_dtype))
    if any(m.scheme.act_order for m in modules.values()):
        warnings.warn("writing actorder 'group' (weight_g_idx): vLLM reads it, but compressed-tensors >= 0.19 "
                      "(transformers' loader) no longer accepts actorder 'group'")
    clash = sorted(set(plain) & set(tensors))
    if clash:
        raise ValueError(f"plain tensors {clash[:5]} collide with quantized module tensors")
    # every 16-bit Linear must be ignored when the target is the class "Linear"; embeddings are not Linears
    linears = {n[: -len(".weight")] for n, t in plain.items()
               if n.endswith(".weight") and t.dim() == 2 and not n.endswith("embed_tokens.weight")}
    names = set(ignore) | linears | ({"lm_head"} if "lm_head" not in modules else set())
    ignore_list = sorted(n for n in names if n not in modules)
    qcfg = quantization_config(modules, ignore_list)
    write_checkpoint(out_dir, {**config, "quantization_config": qcfg}, {**tensors, **plain}, max_shard_size)
