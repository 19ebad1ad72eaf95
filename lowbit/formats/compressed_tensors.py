"""compressed-tensors checkpoints (llm-compressor's output, `quant_method: "compressed-tensors"`). Read and write.

On disk, per quantized Linear `<prefix>.` (b bits, P = 32 // b, G group, formats.md §3; compressed-tensors
compressors/{pack_quantized,naive_quantized}/base.py):

| format            | tensor              | dtype      | shape                        | meaning                                    |
|-------------------|---------------------|------------|------------------------------|--------------------------------------------|
| pack-quantized    | `weight_packed`     | int32      | [N, ceil(K/P)]               | signed q + 2^(b-1), packed along K LSB-first |
|                   | `weight_shape`      | int64      | [2]                          | [N, K]                                     |
|                   | `weight_zero_point` | int32      | [ceil(N/P), ceil(K/G)]       | asym: signed zp + 2^(b-1), packed along N  |
| int-/naive-quant. | `weight`            | int8       | [N, K]                       | signed q; `weight_zero_point` int8 [N, ceil(K/G)] |
| int (both)        | `weight_scale`      | model dtype| [N, ceil(K/G)] (channel [N,1]) | W = (q - zp) * scale                     |
|                   | `weight_g_idx`      | int32      | [K]                          | actorder "group" (older llm-compressor)    |
| float-/naive-q.   | `weight`            | fp8 e4m3   | [N, K]                       | W = weight * scale                         |
|                   | `weight_scale`      | model dtype| tensor [1] / channel [N,1] / block [ceil(N/BN), ceil(K/BK)] |     |
| any, static fp8 act | `input_scale`     | model dtype| [1]                          | x ~= fp8(x / input_scale) * input_scale    |

In memory (canonical, lowbit/scheme.py):

| tensor         | dtype   | shape            | from disk                                                       |
|----------------|---------|------------------|-----------------------------------------------------------------|
| `qweight`      | int32   | [N, ceil(K/P)]   | weight_packed as is (offset-binary = canonical unsigned q); int8 weight + 2^(b-1), packed |
| `scales`       | float32 | [N, ceil(K/G)]   | weight_scale                                                    |
| `zeros`        | int32   | [N, ceil(K/G)]   | asym: zp + 2^(b-1), i.e. the stored unsigned value unpacked along N; (q-zp) = (q_u-z_u) |
| `g_idx`        | int32   | [K]              | weight_g_idx                                                    |
| `weight`       | fp8     | [N, K]           | as is                                                           |
| `weight_scale` | float32 | tensor [] / channel [N] / block grid | reshaped                                    |
| `input_scale`  | float32 | []               | reshaped                                                        |

Which modules are quantized: the tensors decide (weight_packed, weight_scale, an int8/fp8 weight), the config
groups say how. A quantized-looking module that no group targets, or that `ignore` names, fails.
`weight_shape` is checked against the tensors and dropped. The writer lives in compressed_tensors_writer.py.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from lowbit.config import ModelConfig
from lowbit.formats.base import CheckpointFormat, FormatError
from lowbit.formats.compressed_tensors_config import TargetMatcher
from lowbit.formats.int_packing import ModuleTensors, TensorInfo, read_tensors, scan_headers
from lowbit.kernels.reference import pack_int32, unpack_int32
from lowbit.scheme import QuantScheme

QUANT_LEAVES = {"weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "input_scale",
                "input_zero_point", "weight_global_scale", "input_global_scale"}
QUANT_WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2", "I8")  # a `weight` stored like this is quantized
_FLOAT = ("F16", "BF16", "F32")
_INT = ("I32", "I64")


@dataclass(frozen=True)
class _Module:
    scheme: QuantScheme
    format: str
    n: int
    k: int


def _check(prefix: str, leaves: dict[str, TensorInfo], name: str, dtypes, shapes, what: str) -> TensorInfo:
    """Leaf `name` must exist with one of `dtypes` and one of `shapes` (tuples); errors name the tensor."""
    info = leaves.get(name)
    if info is None:
        raise FormatError(f"{prefix}.{name} is missing; {what}")
    if info.dtype not in dtypes:
        raise FormatError(f"{prefix}.{name} has dtype {info.dtype}; {what} (dtype one of {list(dtypes)})")
    if shapes is not None and tuple(info.shape) not in shapes:
        raise FormatError(f"{prefix}.{name} has shape {list(info.shape)}; {what} (shape {list(shapes[0])})")
    return info


def _check_group(prefix: str, scheme: QuantScheme, k: int | None) -> None:
    if not scheme.is_int or k is None:
        return
    g = scheme.effective_group(k)
    if k > g and k % g:
        raise ValueError(f"{prefix}: group_size {g} does not divide in-features K={k}; compressed-tensors "
                         "groups need K % G == 0 (or one group when K < G)")


def check_module(prefix: str, leaves: dict[str, TensorInfo], scheme: QuantScheme, fmt: str,
                 weight_shape: tuple[int, ...] | None) -> _Module:
    """Every tensor a module of `scheme` stored as `fmt` needs, with its dtype and shape; returns (N, K)."""
    what = f"{scheme.describe()} stored as compressed-tensors {fmt}"
    if scheme.is_int and fmt == "pack-quantized":
        if weight_shape is None or len(weight_shape) != 2 or min(weight_shape) <= 0:
            _check(prefix, leaves, "weight_shape", _INT, ((2,),), what)
            raise FormatError(f"{prefix}.weight_shape holds {weight_shape}; {what} needs [N, K]")
        n, k = weight_shape
        _check(prefix, leaves, "weight_packed", ("I32",), ((n, math.ceil(k * scheme.bits / 32)),), what)
    else:
        dtype = "I8" if scheme.is_int else "F8_E4M3"
        w = leaves.get("weight")
        if w is not None and w.dtype == "F8_E5M2":
            raise NotImplementedError(f"{prefix}.weight is float8_e5m2; supported fp8 weights: float8_e4m3fn")
        n, k = _check(prefix, leaves, "weight", (dtype,), None, what).shape
        if weight_shape is not None and tuple(weight_shape) != (n, k):
            raise FormatError(f"{prefix}.weight_shape holds {list(weight_shape)} but {prefix}.weight is [{n}, {k}]")
    allowed = {"weight", "weight_packed", "weight_shape", "weight_scale", "bias"}
    if scheme.is_int:
        _check_group(prefix, scheme, k)
        ng = math.ceil(k / scheme.effective_group(k))
        _check(prefix, leaves, "weight_scale", _FLOAT, ((n, ng),), what)
        if not scheme.symmetric:
            zp_shape = (math.ceil(n * scheme.bits / 32), ng) if fmt == "pack-quantized" else (n, ng)
            _check(prefix, leaves, "weight_zero_point", ("I32",) if fmt == "pack-quantized" else ("I8",),
                   (zp_shape,), what)
        if scheme.act_order:
            _check(prefix, leaves, "weight_g_idx", _INT, ((k,),), what)
        allowed |= {"weight_zero_point", "weight_g_idx"}
    else:
        grids = {"tensor": ((1,), ()), "channel": ((n, 1), (n,))}
        if scheme.weight_granularity == "block":
            bn, bk = scheme.block_size
            grids["block"] = ((math.ceil(n / bn), math.ceil(k / bk)),)
        _check(prefix, leaves, "weight_scale", _FLOAT, grids[scheme.weight_granularity], what)
        allowed.add("weight_zero_point")  # old exports keep all-zero ones for symmetric fp8
    if scheme.static_input_scale:
        _check(prefix, leaves, "input_scale", _FLOAT, ((1,), ()), what)
    allowed |= {"input_scale", "input_zero_point"} if scheme.act_dtype == "fp8_e4m3" else set()
    extra = sorted((set(leaves) & QUANT_LEAVES) - allowed)
    if scheme.is_int and "weight_g_idx" in leaves and not scheme.act_order:
        extra.append("weight_g_idx")
    if extra:
        raise FormatError(f"{prefix}: unexpected tensors {extra} for {what}")
    return _Module(scheme, fmt, n, k)


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"

    def __init__(self, qcfg: dict[str, Any], disk: dict[str, ModuleTensors] | None = None,
                 weight_shapes: dict[str, tuple[int, ...]] | None = None, backend: str | None = None):
        super().__init__(backend)
        check_config(qcfg)
        self.qcfg = qcfg
        self.matcher = TargetMatcher(qcfg)
        self.on_disk = set(disk or {})
        self.modules: dict[str, _Module] = {}
        quantized = []
        for prefix, mt in (disk or {}).items():
            w = mt.leaves.get("weight")
            if not (set(mt.leaves) & QUANT_LEAVES or (w is not None and w.dtype in QUANT_WEIGHT_DTYPES)):
                continue  # 16-bit tensors: norms, embeddings, ignored Linears
            group = self.matcher.match(prefix)
            if group is None:
                why = "the ignore list names it" if self.matcher.ignored(prefix) else "no config group targets it"
                raise FormatError(f"{prefix}: stored quantized ({sorted(mt.leaves)}) but {why}")
            shape = (weight_shapes or {}).get(prefix)
            _check_group(prefix, group.scheme, shape[-1] if shape else (w.shape[-1] if w is not None else None))
            quantized.append((prefix, mt, group, shape))
        for prefix, mt, group, shape in quantized:  # config-level errors above come first, tensor checks here
            self.modules[prefix] = check_module(prefix, mt.leaves, group.scheme, group.format, shape)

    @classmethod
    def matches(cls, model_dir: str, cfg: ModelConfig) -> bool:
        return (cfg.quantization or {}).get("quant_method") == "compressed-tensors"

    @classmethod
    def from_checkpoint(cls, model_dir: str, cfg: ModelConfig, backend: str | None = None) -> "CompressedTensorsFormat":
        disk = scan_headers(model_dir)
        wanted = {f"{p}.weight_shape": mt.leaves["weight_shape"] for p, mt in disk.items()
                  if "weight_shape" in mt.leaves and mt.leaves["weight_shape"].dtype in _INT}
        shapes = {name.rpartition(".")[0]: tuple(int(v) for v in t.reshape(-1).tolist())
                  for name, t in read_tensors(wanted).items()}  # a few [2] ints per module
        return cls(cfg.quantization, disk, shapes, backend)

    def scheme_for(self, prefix: str) -> QuantScheme | None:
        if prefix in self.modules:
            return self.modules[prefix].scheme
        if prefix in self.on_disk:  # stored in 16 bits
            return None
        group = self.matcher.match(prefix)  # not on disk: what the config says a Linear of that name is
        return group.scheme if group else None

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        prefix, _, leaf = name.rpartition(".")
        m = self.modules.get(prefix)
        if m is None or leaf == "bias":
            yield name, tensor
            return
        s, b = m.scheme, m.scheme.bits
        off = 2 ** (b - 1)  # compressed-tensors stores signed q and zp; canonical is unsigned
        if leaf == "weight_shape":
            if tuple(tensor.reshape(-1).tolist()) != (m.n, m.k):
                raise FormatError(f"{name} holds {tensor.tolist()}, expected [{m.n}, {m.k}]")
            return
        if leaf.endswith("zero_point") and (leaf == "input_zero_point" or s.symmetric):
            if bool(tensor.to(torch.float32).any()):
                raise FormatError(f"{name}: non-zero zero points for symmetric {s.describe()}")
            return
        if leaf == "input_scale":
            yield f"{prefix}.input_scale", tensor.to(torch.float32).reshape(())
        elif s.is_int:
            yield from self._convert_int(prefix, leaf, tensor, m, off)
        elif leaf == "weight":
            yield name, tensor
        elif leaf == "weight_scale":
            shape = {"tensor": (), "channel": (m.n,)}.get(s.weight_granularity, tuple(tensor.shape))
            yield name, tensor.to(torch.float32).reshape(shape)
        else:
            yield name, tensor  # not a compressed-tensors leaf: the loader reports it by name

    def _convert_int(self, prefix: str, leaf: str, t: torch.Tensor, m: _Module, off: int):
        b = m.scheme.bits
        if leaf == "weight_packed":
            yield f"{prefix}.qweight", t.to(torch.int32)  # same words: +2^(b-1) offset, LSB-first along K
        elif leaf == "weight":  # int-/naive-quantized: signed int8 [N, K]
            _check_range(f"{prefix}.weight", t, -off, off - 1)
            yield f"{prefix}.qweight", pack_int32(t.to(torch.int32) + off, b)
        elif leaf == "weight_scale":
            yield f"{prefix}.scales", t.to(torch.float32)
        elif leaf == "weight_zero_point":
            if m.format == "pack-quantized":  # [ceil(N/P), G] packed along N -> [N, G] unsigned
                z = unpack_int32(t.t().contiguous(), b, m.n).t().contiguous()
            else:
                _check_range(f"{prefix}.weight_zero_point", t, -off, off - 1)
                z = t.to(torch.int32) + off
            yield f"{prefix}.zeros", z
        elif leaf == "weight_g_idx":
            ng = math.ceil(m.k / m.scheme.effective_group(m.k))
            _check_range(f"{prefix}.weight_g_idx", t, 0, ng - 1)
            yield f"{prefix}.g_idx", t.to(torch.int32)
        else:
            yield f"{prefix}.{leaf}", t

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "version": self.qcfg.get("version"),
                "config_groups": {g.name: {"targets": list(g.targets), "format": g.format,
                                           "scheme": g.scheme.describe()} for g in self.matcher.groups},
                "ignore": list(self.matcher.ignore), "quantized_modules": len(self.modules),
                "schemes": dict(Counter(m.scheme.describe() for m in self.modules.values()))}


def _check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise FormatError(f"{name}: values span [{int(t.min())}, {int(t.max())}], expected [{lo}, {hi}]")


def check_config(qcfg: dict[str, Any]) -> None:
    """The parts of a quantization_config lowbit cannot honour, refused by name."""
    status = qcfg.get("quantization_status", "compressed")
    if status != "compressed":
        raise NotImplementedError(f"compressed-tensors quantization_status {status!r} (weights stored unquantized with "
                                  "fake-quant parameters) is not supported; supported: 'compressed'")
    if qcfg.get("kv_cache_scheme"):
        raise NotImplementedError(f"compressed-tensors kv_cache_scheme {qcfg['kv_cache_scheme']!r} is not supported; "
                                  "supported: none (16-bit KV cache)")
    sparsity = qcfg.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise NotImplementedError(f"compressed-tensors sparsity format {sparsity['format']!r} is not supported; "
                                  "supported: dense")
    if qcfg.get("transform_config"):
        raise NotImplementedError("compressed-tensors transform_config (Hadamard/rotation transforms) is not "
                                  "supported; supported: none")


from lowbit.formats.compressed_tensors_writer import save_checkpoint  # noqa: E402  (the writer, re-exported)

__all__ = ["CompressedTensorsFormat", "save_checkpoint"]
