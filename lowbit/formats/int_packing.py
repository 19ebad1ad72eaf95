"""On-disk helpers shared by the GPTQ and AWQ formats: int32 word packing, header scans, scheme checks, writing.

Packing along the last dim (b bits, P = 32 // b values per int32 word, "order" permutes slots in a word):

| layout      | used by                       | element c of a row sits in                                  |
|-------------|-------------------------------|-------------------------------------------------------------|
| sequential  | GPTQ qweight/qzeros, canonical | word c // P, bits b*(c % P)                                 |
| AWQ GEMM    | AWQ qweight/qzeros (4-bit)    | word c // 8, slot i holds column 8*(c//8) + AWQ_ORDER[i]    |

The sequential words are exactly those of kernels/reference.pack_int32, which this module reuses.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from lowbit.formats.base import FormatError, safetensors_files
from lowbit.kernels.reference import pack_int32, unpack_int32
from lowbit.scheme import QuantScheme

# AutoAWQ awq/utils/packing_utils.py: slot i of a word holds column AWQ_ORDER[i] of its 8
# (its AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7] = argsort, the slot of column j, is computed in unpack_cols)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

SUPPORTED_BITS = (4, 8)


def pack_cols(q: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """q [R, C] in [0, 2^b) -> int32 [R, ceil(C/P)]; `order` interleaves columns within each word."""
    if order is None:
        return pack_int32(q, bits)
    per = 32 // bits
    rows, cols = q.shape
    padded = torch.zeros(rows, math.ceil(cols / per) * per, dtype=q.dtype)
    padded[:, :cols] = q
    # slot i of word w must hold column per*w + order[i]
    return pack_int32(padded.view(rows, -1, per)[:, :, list(order)].reshape(rows, -1), bits)


def unpack_cols(packed: torch.Tensor, bits: int, cols: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, W] -> int32 [R, cols], the inverse of pack_cols."""
    if order is None:
        return unpack_int32(packed, bits, cols)
    per = 32 // bits
    slots = unpack_int32(packed, bits, packed.shape[1] * per).view(packed.shape[0], -1, per)  # [R, W, P]
    inverse = sorted(range(per), key=lambda i: order[i])  # column j came from slot inverse[j]
    return slots[:, :, inverse].reshape(packed.shape[0], -1)[:, :cols].contiguous()


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors name: I32, F16, BF16, F32, ...
    file: str


@dataclass
class ModuleTensors:
    """The tensors of one module prefix, from the safetensors headers (no data read)."""

    leaves: dict[str, TensorInfo] = field(default_factory=dict)


def scan_headers(model_dir: str) -> dict[str, ModuleTensors]:
    """prefix -> its tensors' shapes and dtypes, read from the safetensors headers only."""
    from safetensors import safe_open

    out: dict[str, ModuleTensors] = {}
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                prefix, _, leaf = key.rpartition(".")
                info = TensorInfo(tuple(sl.get_shape()), sl.get_dtype(), path)
                out.setdefault(prefix, ModuleTensors()).leaves[leaf] = info
    return out


def read_tensors(infos: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Load a few named tensors (small ones: g_idx) by the file the header scan found them in."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    out = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            out.update({n: f.get_tensor(n) for n in names})
    return out


SCALE_DTYPES = ("F16", "BF16", "F32")


def check_leaves(prefix: str, leaves: dict[str, TensorInfo], fmt: str) -> None:
    """A module with a qweight has qzeros and scales, with the dtypes and ranks the format writes."""
    for leaf in ("scales", "qzeros"):
        if leaf not in leaves:
            raise FormatError(f"{prefix}.{leaf} is missing: a {fmt} module with {prefix}.qweight needs qzeros "
                              "and scales")
    for leaf, dtypes in (("qweight", ("I32",)), ("qzeros", ("I32",)), ("scales", SCALE_DTYPES)):
        info = leaves[leaf]
        if len(info.shape) != 2 or info.dtype not in dtypes:
            raise FormatError(f"{prefix}.{leaf}: {info.dtype} {list(info.shape)} is not a 2-D "
                              f"{'/'.join(dtypes)} tensor")


def check_groups(prefix: str, leaves: dict[str, TensorInfo], scheme: QuantScheme, fmt: str, k: int, n: int,
                 zero_words: int) -> None:
    """Whole groups along K, scales [K/G, N], qzeros [K/G, zero_words], bias [N]: each mismatch names the tensor."""
    g, gs = scheme.effective_group(k), scheme_group(scheme)
    if k % g:
        raise FormatError(f"{prefix}.qweight: in-features K={k} is not a multiple of group_size {g}; {fmt} stores "
                          "whole groups (supported: K % group_size == 0, or group_size -1)")
    sc, qz = leaves["scales"].shape, leaves["qzeros"].shape
    if sc != (k // g, n):
        raise FormatError(f"{prefix}.scales has shape {list(sc)}, but {prefix}.qweight {list(leaves['qweight'].shape)} "
                          f"(K={k}, N={n}) with group_size {gs} needs [{k // g}, {n}]")
    if qz != (k // g, zero_words):
        raise FormatError(f"{prefix}.qzeros has shape {list(qz)}; K={k}, N={n}, group_size {gs} need "
                          f"[{k // g}, {zero_words}]")
    if "bias" in leaves and leaves["bias"].shape != (n,):
        raise FormatError(f"{prefix}.bias has shape {list(leaves['bias'].shape)}; N={n} needs [{n}]")


def int_scheme(bits, group_size, symmetric: bool, act_order: bool, what: str) -> QuantScheme:
    """The QuantScheme of a GPTQ/AWQ module; group_size -1 (or None) = channel-wise."""
    if bits in (2, 3):
        raise NotImplementedError(f"{what}: {bits}-bit weights are not supported (2/3-bit GPTQ packing); "
                                  f"supported bits: {SUPPORTED_BITS}")
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"{what}: bits={bits!r} is not supported; supported: {SUPPORTED_BITS}")
    if group_size in (-1, None):
        return QuantScheme(f"int{bits}", "channel", symmetric=symmetric, act_order=act_order)
    if not isinstance(group_size, int) or group_size <= 0:
        raise FormatError(f"{what}: group_size={group_size!r} is not supported; "
                          "supported: -1 (channel) or a positive int")
    return QuantScheme(f"int{bits}", "group", group_size=group_size, symmetric=symmetric, act_order=act_order)


def scheme_group(scheme: QuantScheme) -> int:
    """group_size as the configs write it: -1 = channel-wise."""
    return -1 if scheme.weight_granularity == "channel" else int(scheme.group_size)


def check_int_module(prefix: str, scheme: QuantScheme, fmt: str) -> None:
    """Writers take 16-bit-activation int weights only; anything else is another format's job."""
    if not scheme.is_int or scheme.act_dtype != "16bit" or scheme.input_smoothing:
        raise ValueError(f"{prefix}: {fmt} cannot store {scheme.describe()}; supported: int4/int8 weights with "
                         "16-bit activations (w4a16, w8a16) and no pre_quant_scale")


def canonical_tensors(prefix: str, mod, fmt: str) -> dict[str, torch.Tensor]:
    """The module's canonical tensors, checked: exactly the set its scheme implies, zeros in [0, 2^b)."""
    s, t = mod.scheme, mod.tensors
    check_int_module(prefix, s, fmt)
    need = {"qweight", "scales"} | ({"g_idx"} if s.act_order else set()) | (set() if s.symmetric else {"zeros"})
    for key in sorted(set(t) - need - {"bias"}):
        raise ValueError(f"{prefix}.{key}: not part of canonical {s.describe()}; expected {sorted(need)} (+ bias)")
    for key in sorted(need - set(t)):
        raise ValueError(f"{prefix}.{key} is missing for {s.describe()}")
    n, n_groups = t["scales"].shape
    if "zeros" in t and (tuple(t["zeros"].shape) != (n, n_groups) or int(t["zeros"].min()) < 0
                         or int(t["zeros"].max()) >= 2**s.bits):
        raise ValueError(f"{prefix}.zeros must be [{n}, {n_groups}] ints in [0, {2**s.bits}); "
                         f"got {list(t['zeros'].shape)}")
    return t


def check_names(modules: dict, plain: dict, tensors: dict, ignore) -> None:
    both = sorted(set(ignore) & set(modules))
    if both:
        raise ValueError(f"modules {both} are both quantized and listed in ignore")
    clash = sorted(set(plain) & set(tensors))
    if clash:
        raise ValueError(f"plain tensors {clash[:5]} collide with quantized module tensors")


def exact_cast(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Cast scales for disk, refusing a lossy cast (the read-back must be bit-identical)."""
    out = t.to(dtype)
    if not torch.equal(out.to(t.dtype), t):
        raise ValueError(f"{what}: scales are not exactly representable in {dtype}; round them to {dtype} before "
                         "quantizing or pass scale_dtype=torch.float32")
    return out


def in_block_linears(plain: dict[str, torch.Tensor]) -> list[str]:
    """Module prefixes of 16-bit Linears inside decoder blocks (2-D `.weight` under `.layers.`)."""
    return sorted(n[: -len(".weight")] for n, t in plain.items()
                  if n.endswith(".weight") and t.dim() == 2 and ".layers." in n)


def write_checkpoint(out_dir: str, config: dict, tensors: dict[str, torch.Tensor],
                     max_shard_size: int = 5 * 2**30) -> None:
    """config.json + model.safetensors, or model-0000i-of-0000n shards and model.safetensors.index.json."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    stale = [f for f in os.listdir(out_dir) if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    if stale:
        raise FileExistsError(f"{out_dir} already holds weights {stale[:4]}; write into an empty directory")
    seen: set[int] = set()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
