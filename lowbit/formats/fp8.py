"""Native FP8 checkpoints (config.json `quant_method: "fp8"`): DeepSeek-V3/R1, Kimi-K2 and Qwen3-*-FP8
block FP8, and AutoFP8 per-tensor FP8. Reader, plus a writer for the block variant.

On disk, per quantized Linear [N, K] (formats.md §4 and §5.1):

| variant          | tensor                          | dtype       | shape                    | meaning                         |
|------------------|---------------------------------|-------------|--------------------------|---------------------------------|
| block (DeepSeek) | `weight`                        | e4m3fn      | [N, K]                   |                                 |
|                  | `weight_scale_inv`              | f32 (bf16?) | [ceil(N/BN), ceil(K/BK)] | W = weight * s: MULTIPLIES      |
| tensor (AutoFP8) | `weight`                        | e4m3fn      | [N, K]                   |                                 |
|                  | `weight_scale`                  | f32         | [] or [1]                | W = weight * s, s = amax/448    |
|                  | `input_scale` (old `act_scale`) | f32         | [] or [1]                | static activations only         |
| KV cache         | `k_proj.output_scale`, `k_scale`, `v_scale` | f32 | []                | dropped: no fp8 KV cache yet    |

In memory (canonical, lowbit/scheme.py), names "<prefix>.<leaf>":

| variant | `weight`      | `weight_scale`                  | `input_scale`    | scheme                                        |
|---------|---------------|---------------------------------|------------------|-----------------------------------------------|
| block   | [N, K] e4m3fn | [ceil(N/BN), ceil(K/BK)] f32    | -                | fp8 block BNxBK, act fp8 token_group BK (ue8m0) |
| tensor  | [N, K] e4m3fn | [] f32                          | [] f32 (static)  | fp8 tensor, act fp8 tensor_static / _dynamic  |

Which modules are quantized is read from the safetensors headers (an fp8 `weight`); `modules_to_not_convert`
(Qwen lists norms and routers too) and `ignored_layers` only have to agree with them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import warnings
from typing import Any, Iterator, Sequence

import torch

from lowbit.config import ModelConfig
from lowbit.formats.base import CheckpointFormat, FormatError, QuantizedModule, matches_any, read_json, safetensors_files
from lowbit.scheme import QuantScheme

FP8 = "F8_E4M3"  # safetensors dtype names
FLOATS = ("F32", "BF16", "F16")
KV_SCALES = ("k_scale", "v_scale", "output_scale", "kv_scale")  # fp8 KV-cache calibration, unused for now

Leaves = dict[str, tuple[str, tuple[int, ...]]]  # leaf -> (safetensors dtype, shape)


# ---- shared by the fp8 and modelopt readers ------------------------------------------------------

def read_headers(model_dir: str, rename=lambda name: name) -> dict[str, Leaves]:
    """Every tensor's dtype and shape (headers only, nothing loaded), grouped by module prefix."""
    from safetensors import safe_open

    modules: dict[str, Leaves] = {}
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                prefix, _, leaf = rename(key).rpartition(".")
                modules.setdefault(prefix, {})[leaf] = (s.get_dtype(), tuple(s.get_shape()))
    return modules


def listed(prefix: str, patterns: Sequence[str]) -> bool:
    """Module or one of its parents named by an exact/suffix name, `re:` regex or shell wildcard (ModelOpt)."""
    parts = prefix.split(".")
    names = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # the module, then its parents
    wild = [p for p in patterns if not p.startswith("re:") and any(c in p for c in "*?[")]
    plain = [p for p in patterns if p not in wild]
    return any(fnmatch.fnmatchcase(n, p) for p in wild for n in names) or any(matches_any(n, plain) for n in names)


def warn_kv_scales(modules: dict[str, Leaves], fmt: str) -> list[str]:
    """One warning per checkpoint for the fp8 KV-cache scales that convert() drops."""
    dropped = sorted(f"{p}.{leaf}" for p, leaves in modules.items() for leaf in leaves if leaf in KV_SCALES)
    if dropped:
        warnings.warn(f"{fmt}: fp8 KV-cache scales ({len(dropped)}, e.g. {dropped[0]}) are ignored: "
                      "lowbit keeps the KV cache in the model dtype", stacklevel=3)
    return dropped


def reject_stray_scales(prefix: str, leaves: Leaves, scales: Sequence[str], quantized: str) -> None:
    """A module whose weight is not quantized must carry none of `scales`; `quantized` names the dtypes that may."""
    stray = sorted(set(leaves) & set(scales))
    if stray:
        w = leaves.get("weight")
        raise FormatError(f"{prefix}.{stray[0]}: a weight scale beside a {w[0] if w else 'missing'} weight; "
                          f"{quantized}")


def check_block(prefix: str, leaves: Leaves, block: tuple[int, int]) -> None:
    """fp8 `weight` [N, K] + `weight_scale_inv` on the ceil grid [ceil(N/BN), ceil(K/BK)]."""
    shape = leaves["weight"][1]
    if len(shape) != 2:
        raise FormatError(f"{prefix}.weight: fp8 weight of shape {shape}; expected 2-D [N, K]")
    if "weight_scale_inv" not in leaves:
        hint = " (found a per-tensor `weight_scale`)" if "weight_scale" in leaves else ""
        raise FormatError(f"{prefix}.weight_scale_inv is missing: block-fp8 weight {prefix}.weight needs its "
                          f"[ceil(N/{block[0]}), ceil(K/{block[1]})] scale grid{hint}")
    dtype, got = leaves["weight_scale_inv"]
    n, k = shape
    want = (math.ceil(n / block[0]), math.ceil(k / block[1]))
    if got != want:
        raise FormatError(f"{prefix}.weight_scale_inv: shape {got}, expected {want} = (ceil({n}/{block[0]}), "
                          f"ceil({k}/{block[1]})) for weight {shape}; block scale grids round up (partial edge blocks)")
    if dtype not in FLOATS:
        raise FormatError(f"{prefix}.weight_scale_inv: dtype {dtype}; supported: {FLOATS}")


def check_scalar(prefix: str, leaves: Leaves, leaf: str, why: str) -> None:
    if leaf not in leaves:
        raise FormatError(f"{prefix}.{leaf} is missing: {why}")
    dtype, shape = leaves[leaf]
    if math.prod(shape) != 1 or dtype not in FLOATS:
        raise FormatError(f"{prefix}.{leaf}: {dtype} {shape}; expected one float ([] or [1]) per module")


def check_tensor(prefix: str, leaves: Leaves, static: bool) -> None:
    """Per-tensor fp8: scalar `weight_scale`, and scalar `input_scale` for static activations."""
    if len(leaves["weight"][1]) != 2:
        raise FormatError(f"{prefix}.weight: fp8 weight of shape {leaves['weight'][1]}; expected 2-D [N, K]")
    hint = " (found `weight_scale_inv`, a block-fp8 scale grid)" if "weight_scale_inv" in leaves else ""
    check_scalar(prefix, leaves, "weight_scale", f"per-tensor fp8 weight {prefix}.weight needs it{hint}")
    if static:
        check_scalar(prefix, leaves, "input_scale", "static fp8 activations need one scale per module")


def positive_scalar(name: str, t: torch.Tensor) -> torch.Tensor:
    """A scale read from disk: one finite positive float, as a 0-dim float32 tensor."""
    t = t.to(torch.float32).reshape(())
    if not bool(torch.isfinite(t)) or float(t) <= 0:
        raise FormatError(f"{name}: scale {float(t)} is not a finite positive number")
    return t


def block_scheme(block: Sequence[int], ue8m0: bool) -> QuantScheme:
    bn, bk = (int(b) for b in block)
    # DeepSeek act_quant: per token, per BK-wide group along K, dynamic
    return QuantScheme("fp8_e4m3", "block", block_size=(bn, bk), act_dtype="fp8_e4m3", act_granularity="token_group",
                       act_group_size=bk, ue8m0_scales=ue8m0)


# ---- reader --------------------------------------------------------------------------------------

def _legacy(name: str) -> str:
    return name[: -len("act_scale")] + "input_scale" if name.endswith(".act_scale") else name


class Fp8Format(CheckpointFormat):
    name = "fp8"

    def __init__(self, backend: str | None, scheme: QuantScheme, quantized: set[str], info: dict[str, Any]):
        super().__init__(backend)
        self.scheme, self.quantized, self.info = scheme, quantized, info

    @classmethod
    def matches(cls, model_dir: str, cfg: ModelConfig) -> bool:
        return (cfg.quantization or {}).get("quant_method") == "fp8"

    @classmethod
    def from_checkpoint(cls, model_dir: str, cfg: ModelConfig, backend: str | None = None) -> "Fp8Format":
        q = cfg.quantization or {}
        if str(q.get("fmt", "e4m3")).lower() not in ("e4m3", "float8_e4m3fn"):
            raise NotImplementedError(f"fp8 quantization_config.fmt {q['fmt']!r} is not supported; supported: e4m3")
        acts = q.get("activation_scheme", "dynamic")
        if acts not in ("static", "dynamic"):
            raise ValueError(f"fp8 activation_scheme {acts!r} is not supported; supported: static, dynamic")
        # DeepSeek-V3.1 puts scale_fmt at the top of config.json, later configs inside quantization_config
        scale_fmt = q.get("scale_fmt") or (read_json(os.path.join(model_dir, "config.json")) or {}).get("scale_fmt")
        if scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"fp8 scale_fmt {scale_fmt!r} is not supported; supported: ue8m0 (or none)")
        block = q.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
                raise ValueError(f"fp8 weight_block_size {block!r}: expected two positive ints [BN, BK]")
            if acts != "dynamic":
                raise NotImplementedError("block fp8 with activation_scheme 'static' is not supported; supported: dynamic")
            scheme = block_scheme(block, scale_fmt == "ue8m0")
        else:
            scheme = QuantScheme("fp8_e4m3", "tensor", act_dtype="fp8_e4m3", act_granularity=f"tensor_{acts}")
        ignore = list(q.get("ignored_layers") or []) + list(q.get("modules_to_not_convert") or [])

        modules = read_headers(model_dir, _legacy)
        quantized = set()
        for prefix, leaves in sorted(modules.items()):
            w = leaves.get("weight")
            if w is None or w[0] != FP8:
                reject_stray_scales(prefix, leaves, ("weight_scale_inv", "weight_scale"),
                                    "only float8_e4m3fn weights (F8_E4M3) carry scales")
                continue
            if listed(prefix, ignore):
                raise FormatError(f"{prefix}.weight is stored as fp8 but {prefix} is listed in "
                                  "modules_to_not_convert/ignored_layers")
            if block is not None:
                check_block(prefix, leaves, scheme.block_size)
            else:
                check_tensor(prefix, leaves, acts == "static")
            quantized.add(prefix)
        if not quantized:
            raise NotImplementedError(f"{model_dir}: quant_method 'fp8' but no weight is stored as float8_e4m3fn; "
                                      "quantizing a 16-bit checkpoint on load is not supported (use `lowbit quantize`)")
        info = {"variant": "block" if block else "tensor", "not_converted": ignore,
                "dropped": warn_kv_scales(modules, "fp8")}
        return cls(backend, scheme, quantized, info)

    def scheme_for(self, prefix: str) -> QuantScheme | None:
        return self.scheme if prefix in self.quantized else None

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        name = _legacy(name)
        prefix, _, leaf = name.rpartition(".")
        if leaf in KV_SCALES:
            return
        if prefix not in self.quantized:
            yield name, tensor
        elif leaf == "weight_scale_inv":  # despite the name it multiplies (DeepSeek inference/kernel.py)
            yield f"{prefix}.weight_scale", tensor.to(torch.float32)
        elif leaf == "weight_scale":
            yield name, positive_scalar(name, tensor)
        elif leaf == "input_scale":
            if self.scheme.static_input_scale:  # dynamic checkpoints may carry an unused calibration scale
                yield name, positive_scalar(name, tensor)
        else:
            yield name, tensor

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "scheme": self.scheme.describe(), "quantized_modules": len(self.quantized),
                **self.info}


# ---- writer --------------------------------------------------------------------------------------

def write_files(out_dir: str, config: dict, tensors: dict[str, torch.Tensor], max_shard_size: int,
                extra_json: dict[str, dict] | None = None) -> None:
    """config.json (+ extra json files) and safetensors: one file, or shards + model.safetensors.index.json."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    if any(f.endswith(".safetensors") for f in os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already holds safetensors files; write a checkpoint into an empty directory")
    for fname, obj in {"config.json": config, **(extra_json or {})}.items():
        with open(os.path.join(out_dir, fname), "w") as f:
            json.dump(obj, f, indent=2)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, seen = 0, set()
    for name, t in tensors.items():
        t = t.detach().contiguous()
        t = t.clone() if t.untyped_storage().data_ptr() in seen else t  # safetensors refuses shared storage (tied)
        seen.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards, size = shards + [{}], 0
        shards[-1][name], size = t, size + nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_checkpoint(out_dir: str, config: dict, modules: dict[str, QuantizedModule], plain: dict[str, torch.Tensor],
                    ignore: Sequence[str] = (), max_shard_size: int = 5 * 2**30) -> None:
    """DeepSeek-style block FP8: `weight` e4m3 + float32 `weight_scale_inv`, quantization_config as DeepSeek-V3's
    (plus `modules_to_not_convert` = ignore, and `scale_fmt: ue8m0` for power-of-two activation scales)."""
    schemes = {m.scheme for m in modules.values()}
    if len(schemes) != 1:
        raise ValueError(f"block-fp8 writer: needs one scheme shared by every module, got "
                         f"{sorted(s.describe() for s in schemes) or 'no modules'}")
    scheme = schemes.pop()
    if not (scheme.weight_granularity == "block" and scheme == block_scheme(scheme.block_size, scheme.ue8m0_scales)):
        raise ValueError(f"block-fp8 writer: scheme {scheme.describe()} is not supported; supported: fp8 block "
                         "BNxBK weights with dynamic per-token-group(BK) fp8 activations (w8a8_fp8_block)")
    both = sorted(set(ignore) & set(modules))
    if both:
        raise ValueError(f"block-fp8 writer: modules {both} are both quantized and listed in ignore")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in sorted(modules.items()):
        extra = sorted(set(mod.tensors) - {"weight", "weight_scale", "bias"})
        if extra or {"weight", "weight_scale"} - set(mod.tensors):
            raise ValueError(f"block-fp8 writer: {prefix} has tensors {sorted(mod.tensors)}; expected weight, "
                             "weight_scale and optionally bias")
        w, s = mod.tensors["weight"], mod.tensors["weight_scale"]
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"block-fp8 writer: {prefix}.weight is {w.dtype}; expected torch.float8_e4m3fn")
        leaves = {"weight": (FP8, tuple(w.shape)), "weight_scale_inv": ("F32", tuple(s.shape))}
        check_block(prefix, leaves, scheme.block_size)
        tensors[f"{prefix}.weight"] = w
        tensors[f"{prefix}.weight_scale_inv"] = s.to(torch.float32)
        if "bias" in mod.tensors:
            tensors[f"{prefix}.bias"] = mod.tensors["bias"]
    clash = sorted(set(plain) & set(tensors))
    if clash:
        raise ValueError(f"block-fp8 writer: plain tensors {clash[:5]} collide with quantized module tensors")
    qcfg = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": list(scheme.block_size), "modules_to_not_convert": list(ignore)}
    if scheme.ue8m0_scales:
        qcfg["scale_fmt"] = "ue8m0"
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    write_files(out_dir, {**config, "quantization_config": qcfg}, {**tensors, **plain}, max_shard_size)
