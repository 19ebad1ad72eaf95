"""QuantScheme: what the numbers of one quantized Linear mean, independent of the file format.

Every format reader produces one per layer group; nothing downstream looks at the format again.

Canonical in-memory tensors of a quantized Linear (output dim N first, so fused q/k/v or gate/up
shards are row ranges; K = in_features, G = group size, b = bits, P = 32 // b values per int32):

| weight dtype | tensor        | dtype          | shape                 | meaning                                   |
|--------------|---------------|----------------|-----------------------|-------------------------------------------|
| int4 / int8  | `qweight`     | int32          | [N, ceil(K/P)]        | unsigned q in [0, 2^b), packed along K, LSB-first: element k at bits b*(k%P) of word k//P |
|              | `scales`      | fp16/bf16/fp32 | [N, ceil(K/G)]        | W = (q - zero) * scale                    |
|              | `zeros`       | int32          | [N, ceil(K/G)]        | true zero point; absent when symmetric (zero = 2^(b-1)) |
|              | `g_idx`       | int32          | [K]                   | group of input column k (act-order); absent when g = k // G |
| fp8_e4m3     | `weight`      | float8_e4m3fn  | [N, K]                | W = weight * scale                        |
|              | `weight_scale`| float32        | tensor: [S] (one per fused shard) / channel: [N] / block: [sum_s ceil(N_s/BN), ceil(K/BK)] |
|              | `input_scale` | float32        | [S]                   | static activation scale per shard (max'ed at load) |
| w4a8 (int4 w, fp8 act) | int4 tensors above (symmetric) + `input_scale` [S] for static activations |
| any          | `pre_quant_scale` | model dtype | [K]                 | AWQ smoothing not folded into the previous op: x' = x * pre_quant_scale |
| int4 (ModelOpt) | `weight_scale_2` | float32     | [S]                   | per-shard fp8 second-level scale (kept for kernels; `scales` are already absolute) |

Channel-wise int weights are group-wise with G = K. Block scales are per shard: shard s of a fused
layer has its own ceil(N_s/BN) scale rows (partial edge blocks when N_s or K are not multiples).
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_DTYPES = ("int4", "int8", "fp8_e4m3")
WEIGHT_GRANULARITIES = ("group", "channel", "tensor", "block")
ACT_DTYPES = ("16bit", "fp8_e4m3")
ACT_GRANULARITIES = ("tensor_static", "tensor_dynamic", "token", "token_group")

FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class QuantScheme:
    weight_dtype: str
    weight_granularity: str
    group_size: int | None = None  # G, for "group"
    block_size: tuple[int, int] | None = None  # (BN, BK), for "block"
    symmetric: bool = True  # False: per-group zero points
    act_order: bool = False  # g_idx present
    act_dtype: str = "16bit"
    act_granularity: str | None = None  # for fp8 activations
    act_group_size: int | None = None  # 128 for "token_group"
    ue8m0_scales: bool = False  # power-of-two activation scales (DeepSeek-V3.1 style)
    input_smoothing: bool = False  # per-input-channel `pre_quant_scale` multiplies x first (ModelOpt AWQ)

    def __post_init__(self):
        def bad(what, value, allowed):
            raise ValueError(f"QuantScheme: {what} {value!r} is not supported; supported: {allowed}")

        if self.weight_dtype not in WEIGHT_DTYPES:
            bad("weight dtype", self.weight_dtype, WEIGHT_DTYPES)
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            bad("weight granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        if self.act_dtype not in ACT_DTYPES:
            bad("activation dtype", self.act_dtype, ACT_DTYPES)
        if self.weight_granularity == "group" and (self.group_size is None or self.group_size <= 0):
            raise ValueError(f"QuantScheme: group-wise weights need a positive group size, got {self.group_size}")
        if self.weight_granularity == "block" and (self.block_size is None or min(self.block_size) <= 0):
            raise ValueError(f"QuantScheme: block-wise weights need a block size, got {self.block_size}")
        if self.is_int and self.weight_granularity in ("tensor", "block"):
            bad(f"{self.weight_dtype} weight granularity", self.weight_granularity, ("group", "channel"))
        if self.is_fp8_weight and self.weight_granularity == "group":
            bad("fp8 weight granularity", self.weight_granularity, ("tensor", "channel", "block"))
        if self.act_dtype == "fp8_e4m3" and self.act_granularity not in ACT_GRANULARITIES:
            bad("fp8 activation granularity", self.act_granularity, ACT_GRANULARITIES)
        if self.act_granularity == "token_group" and not self.act_group_size:
            raise ValueError("QuantScheme: token_group activations need act_group_size (128)")
        if self.act_order and not self.is_int:
            raise ValueError("QuantScheme: act-order (g_idx) applies to int weights only")

    # ---- derived --------------------------------------------------------------------------------

    @property
    def is_int(self) -> bool:
        return self.weight_dtype in ("int4", "int8")

    @property
    def is_fp8_weight(self) -> bool:
        return self.weight_dtype == "fp8_e4m3"

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8, "fp8_e4m3": 8}[self.weight_dtype]

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @property
    def static_input_scale(self) -> bool:
        return self.act_dtype == "fp8_e4m3" and self.act_granularity == "tensor_static"

    def effective_group(self, k: int) -> int:
        """G along K for int weights (channel-wise = one group of K)."""
        return k if self.weight_granularity == "channel" else int(self.group_size)

    @property
    def name(self) -> str:
        """Kernel-family name: w4a16, w8a16, w4a8, w8a8_fp8, w8a8_fp8_block, w8a16_fp8."""
        w = "w4" if self.weight_dtype == "int4" else "w8"
        if self.act_dtype == "16bit":
            return f"{w}a16_fp8" if self.is_fp8_weight else f"{w}a16"
        if self.is_int:
            return f"{w}a8"
        return "w8a8_fp8_block" if self.weight_granularity == "block" else "w8a8_fp8"

    def describe(self) -> str:
        if self.weight_granularity == "group":
            w = f"{self.weight_dtype} g{self.group_size}"
        elif self.weight_granularity == "block":
            w = f"{self.weight_dtype} block {self.block_size[0]}x{self.block_size[1]}"
        else:
            w = f"{self.weight_dtype} per-{self.weight_granularity}"
        if self.is_int:
            w += " sym" if self.symmetric else " asym"
            if self.act_order:
                w += " act-order"
        a = "16-bit" if self.act_dtype == "16bit" else f"fp8 {self.act_granularity}"
        if self.act_granularity == "token_group":
            a += f" {self.act_group_size}"
        return f"{self.name} (weights {w}, activations {a})"


# the schemes lowbit's own quantizer writes, and presets for tests
W4A16_G128 = QuantScheme("int4", "group", group_size=128)
W8A16_CHANNEL = QuantScheme("int8", "channel")
FP8_TENSOR_STATIC = QuantScheme("fp8_e4m3", "tensor", act_dtype="fp8_e4m3", act_granularity="tensor_static")
FP8_CHANNEL_TOKEN = QuantScheme("fp8_e4m3", "channel", act_dtype="fp8_e4m3", act_granularity="token")
FP8_BLOCK = QuantScheme("fp8_e4m3", "block", block_size=(128, 128), act_dtype="fp8_e4m3",
                        act_granularity="token_group", act_group_size=128)
W4A8_TENSOR_STATIC = QuantScheme("int4", "group", group_size=128, act_dtype="fp8_e4m3", act_granularity="tensor_static")
