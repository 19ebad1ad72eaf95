"""compressed-tensors `quantization_config` <-> QuantSchemes, and its target / ignore matching.

A config group is `{targets, weights, input_activations, output_activations, format}` with
`QuantizationArgs` dicts (compressed-tensors src/compressed_tensors/quantization/{quant_scheme,quant_args}.py,
formats.md §3.3). What each pair of arguments means here:

| weights (type, bits, strategy)          | input_activations (float 8-bit)          | QuantScheme                         |
|-----------------------------------------|------------------------------------------|-------------------------------------|
| int 4/8, group G (actorder group: g_idx)| none / tensor static / tensor dynamic /  | int4/int8 group G (act_order)       |
| int 4/8, channel (group_size -1)        | token / group 128 dynamic                | int4/int8 channel                   |
| float 8, tensor / channel / block BNxBK | -> act tensor_static / tensor_dynamic /  | fp8_e4m3 tensor / channel / block   |
|                                         |    token / token_group 128               |                                     |

Matching follows compressed-tensors (quantization/lifecycle/apply.py, utils/match.py): a target is an exact
module name, `re:<regex>` (re.match, anchored at the start only) or a class name ("Linear"); when several
targets match, exact names win over regexes (each sorted by string), regexes over class names, and a target
string named by two groups belongs to the later one. `ignore` uses the same rules and always wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lowbit.formats.base import FormatError
from lowbit.scheme import QuantScheme

KNOWN_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask", "int-quantized", "float-quantized",
                 "naive-quantized", "pack-quantized", "marlin-24", "mixed-precision", "nvfp4-pack-quantized",
                 "mxfp4-pack-quantized", "mxfp8-quantized")  # compressed_tensors/config/base.py
INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")  # int weights: packed int32 / plain int8
FLOAT_FORMATS = ("float-quantized", "naive-quantized")  # fp8 weights stored as float8_e4m3fn
READ_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
CLASS_TARGETS = ("Linear",)  # the module classes lowbit quantizes
SCALE_DTYPES = (None, "torch.float16", "torch.bfloat16", "torch.float32", "float16", "bfloat16", "float32")
_ACT_ORDER_GROUP = ("group", "dynamic")  # "dynamic" is compressed-tensors' alias of "group"


def _is_class(target: str) -> bool:
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def name_matches(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else name == target


@dataclass(frozen=True)
class Group:
    name: str
    targets: tuple[str, ...]
    scheme: QuantScheme
    format: str


def _args(raw: Any, what: str) -> dict[str, Any] | None:
    """A QuantizationArgs dict with compressed-tensors' defaults filled in (strategy inferred from group_size)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FormatError(f"{what}: expected a QuantizationArgs object, got {raw!r}")
    a = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": None,
         "block_structure": None, "dynamic": False, "actorder": None, "scale_dtype": None, **raw}
    a["type"] = str(a["type"]).lower()
    if a["strategy"] is None:
        g = a["group_size"]
        a["strategy"] = "tensor" if g is None else "channel" if g == -1 else "group"
    a["strategy"] = str(a["strategy"]).lower()
    if isinstance(a["block_structure"], str):  # "128x128" is accepted by compressed-tensors too
        a["block_structure"] = [int(v) for v in a["block_structure"].split("x")]
    return a


def _weight_scheme_fields(w: dict[str, Any], fmt: str, what: str) -> dict[str, Any]:
    if w.get("dynamic"):
        raise NotImplementedError(f"{what}: dynamic weight quantization is not supported; supported: static weights")
    if w["scale_dtype"] not in SCALE_DTYPES:
        raise NotImplementedError(f"{what}: weight scale_dtype {w['scale_dtype']!r} (MX/NVFP4 scales) is not "
                                  "supported; supported: float16, bfloat16, float32 scales")
    bits, strategy = w["num_bits"], w["strategy"]
    if w["type"] == "int":
        if bits not in (4, 8):
            raise NotImplementedError(f"{what}: {bits}-bit int weights are not supported; supported: 4, 8 bits")
        if fmt not in INT_FORMATS:
            raise FormatError(f"{what}: format {fmt!r} cannot hold int weights; int weights use {INT_FORMATS}")
        act_order = str(w["actorder"]).lower() in _ACT_ORDER_GROUP or w["actorder"] is True
        if strategy == "group":
            g = w["group_size"]
            if not isinstance(g, int) or g <= 0:
                raise FormatError(f"{what}: strategy group needs a positive group_size, got {g!r}")
            return dict(weight_dtype=f"int{bits}", weight_granularity="group", group_size=g,
                        symmetric=bool(w["symmetric"]), act_order=act_order)
        if act_order:
            raise FormatError(f"{what}: actorder {w['actorder']!r} needs strategy group, got {strategy!r}")
        if strategy == "channel":
            return dict(weight_dtype=f"int{bits}", weight_granularity="channel", symmetric=bool(w["symmetric"]))
        raise NotImplementedError(f"{what}: int weight strategy {strategy!r} is not supported; supported: group, channel")
    if w["type"] != "float":
        raise FormatError(f"{what}: weight type {w['type']!r} is unknown; supported: int, float")
    if bits != 8:
        raise NotImplementedError(f"{what}: {bits}-bit float weights (NVFP4/MXFP4) are not supported; supported: "
                                  "float 8-bit (fp8 e4m3), int 4/8-bit")
    if fmt not in FLOAT_FORMATS:
        raise FormatError(f"{what}: format {fmt!r} cannot hold fp8 weights; fp8 weights use {FLOAT_FORMATS}")
    if not w["symmetric"]:
        raise NotImplementedError(f"{what}: asymmetric fp8 weights are not supported; supported: symmetric")
    if strategy in ("tensor", "channel"):
        return dict(weight_dtype="fp8_e4m3", weight_granularity=strategy)
    if strategy == "block":
        bs = w["block_structure"]
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(v, int) and v > 0 for v in bs)):
            raise FormatError(f"{what}: strategy block needs block_structure [rows, cols], got {bs!r}")
        return dict(weight_dtype="fp8_e4m3", weight_granularity="block", block_size=(bs[0], bs[1]))
    raise NotImplementedError(f"{what}: fp8 weight strategy {strategy!r} is not supported; supported: tensor, channel, block")


def _act_scheme_fields(a: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if a is None:
        return {}
    if a["type"] != "float" or a["num_bits"] != 8:
        raise NotImplementedError(f"{what}: {a['type']}{a['num_bits']} activations are not supported; supported: "
                                  "16-bit or float 8-bit (fp8 e4m3) input activations")
    if not a["symmetric"] or a["dynamic"] not in (True, False):
        raise NotImplementedError(f"{what}: fp8 activations with symmetric={a['symmetric']}, dynamic={a['dynamic']!r} "
                                  "are not supported; supported: symmetric, dynamic true/false")
    fp8 = {"act_dtype": "fp8_e4m3"}
    strategy, dynamic = a["strategy"], bool(a["dynamic"])
    if strategy == "tensor":
        return {**fp8, "act_granularity": "tensor_dynamic" if dynamic else "tensor_static"}
    if strategy == "token" and dynamic:
        return {**fp8, "act_granularity": "token"}
    if strategy == "group" and dynamic and isinstance(a["group_size"], int) and a["group_size"] > 0:
        return {**fp8, "act_granularity": "token_group", "act_group_size": a["group_size"]}
    raise NotImplementedError(f"{what}: fp8 activation strategy {strategy!r} (dynamic={dynamic}) is not supported; "
                              "supported: tensor (static or dynamic), token (dynamic), group (dynamic, per token)")


def parse_group(name: str, raw: Any, global_format: str | None) -> Group:
    what = f"compressed-tensors config group {name!r}"
    if not isinstance(raw, dict):
        raise NotImplementedError(f"{what}: a preset name with a target list ({raw!r}) is not supported; "
                                  "supported: groups written out as {targets, weights, input_activations}")
    fmt = raw.get("format") or global_format
    if fmt in (None, "mixed-precision"):
        raise FormatError(f"{what}: no per-group `format` while the global format is {fmt!r}")
    if fmt not in KNOWN_FORMATS:
        raise ValueError(f"{what}: unknown format {fmt!r}; supported: {READ_FORMATS}")
    if fmt not in READ_FORMATS:
        raise NotImplementedError(f"{what}: format {fmt!r} is not supported; supported: {READ_FORMATS}")
    targets = raw.get("targets") or []
    if isinstance(targets, str):
        targets = [targets]
    odd = [t for t in targets if _is_class(t) and t not in CLASS_TARGETS]
    if odd:
        raise NotImplementedError(f"{what}: targets {odd} name module classes lowbit does not quantize; supported: "
                                  f"{CLASS_TARGETS}, exact module names, 're:' regexes")
    if raw.get("output_activations"):
        raise NotImplementedError(f"{what}: output activation quantization is not supported; supported: weights + inputs")
    w = _args(raw.get("weights"), f"{what} weights")
    if w is None:
        raise NotImplementedError(f"{what}: activation-only quantization (no `weights`, e.g. attention or KV-cache "
                                  "schemes) is not supported; supported: groups that quantize Linear weights")
    fields = _weight_scheme_fields(w, fmt, f"{what} weights")
    fields.update(_act_scheme_fields(_args(raw.get("input_activations"), f"{what} input_activations"),
                                     f"{what} input_activations"))
    return Group(name, tuple(targets), QuantScheme(**fields), fmt)


class TargetMatcher:
    """Which config group quantizes a Linear called `name` (None: ignored or untargeted)."""

    def __init__(self, qcfg: dict[str, Any]):
        groups = qcfg.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise FormatError(f"compressed-tensors quantization_config has no config_groups (got {groups!r})")
        self.groups = [parse_group(n, g, qcfg.get("format")) for n, g in groups.items()]
        self.ignore = [str(i) for i in (qcfg.get("ignore") or [])]
        self.by_target: dict[str, Group] = {}
        for g in self.groups:  # later groups take a repeated target string
            for t in g.targets:
                self.by_target[t] = g
        exact = sorted(t for t in self.by_target if not t.startswith("re:") and not _is_class(t))
        regex = sorted(t for t in self.by_target if t.startswith("re:"))
        self.order = exact + regex + [t for t in self.by_target if _is_class(t)]

    def ignored(self, name: str) -> bool:
        return any(name_matches(name, i) or i in CLASS_TARGETS for i in self.ignore)

    def match(self, name: str) -> Group | None:
        if self.ignored(name):
            return None
        for t in self.order:
            if t in CLASS_TARGETS or name_matches(name, t):
                return self.by_target[t]
        return None


def scheme_args(s: QuantScheme) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(weights, input_activations, format) as llm-compressor writes them for scheme `s`.

    `scale_dtype` / `zp_dtype` are left out: compressed-tensors < 0.12 forbids unknown keys, newer releases
    default them to what llm-compressor writes (model-dtype scales, int8 zero points).
    """
    if s.input_smoothing or s.ue8m0_scales:
        raise NotImplementedError(f"compressed-tensors cannot express {s.describe()} with "
                                  f"{'pre_quant_scale' if s.input_smoothing else 'ue8m0 activation scales'}; "
                                  "supported: int4/int8 group/channel and fp8 tensor/channel/block weights")
    base = {"block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    if s.is_int:
        group = s.weight_granularity == "group"
        w = {**base, "num_bits": s.bits, "type": "int", "symmetric": s.symmetric,
             "strategy": s.weight_granularity, "group_size": s.group_size if group else None,
             "actorder": "group" if s.act_order else None}
        fmt = "pack-quantized"  # also for fp8 activations: vLLM's W4A8-FP8 scheme reads weight_packed
    else:
        w = {**base, "num_bits": 8, "type": "float", "symmetric": True, "strategy": s.weight_granularity,
             "group_size": None, "block_structure": list(s.block_size) if s.block_size else None}
        fmt = "float-quantized"
    if s.act_dtype == "16bit":
        return w, None, fmt
    strategy = {"tensor_static": "tensor", "tensor_dynamic": "tensor", "token": "token", "token_group": "group"}
    a = {**base, "num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy[s.act_granularity],
         "group_size": s.act_group_size if s.act_granularity == "token_group" else None,
         "dynamic": not s.static_input_scale, "observer": "minmax" if s.static_input_scale else None}
    return w, a, fmt
