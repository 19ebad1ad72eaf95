"""Independent producers for the fp8 / ModelOpt / W4AFP8 checkpoint tests. The real ones (DeepSeek's scripts,
AutoFP8, ModelOpt, TRT-LLM) cannot be installed here, so these functions write the layouts of formats.md (§4 block
fp8, §5 per-tensor fp8, §6 W4A8) with their own quantizers and packers; nothing here calls lowbit's readers or
writers. Each `write_*` rewrites a tests.helpers.make_hf_model checkpoint in place and turns the in-memory HF model
into the reference: Linear weights dequantized, fp8 activations fake-quantized by forward pre-hooks with
lowbit.kernels.reference.quantize_fp8_ref (the specification of the fp8 GEMM input)."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.reference import dequantize_fp8_act, quantize_fp8_ref
from tests.helpers import VOCAB

E4M3 = torch.float8_e4m3fn


# ---- quantizers and packers (formats.md) ---------------------------------------------------------

def quant_fp8_block(w: torch.Tensor, bn: int = 128, bk: int = 128, pow2: bool = False):
    """DeepSeek block fp8 (§4.2/4.3): zero-padded BNxBK blocks, s = amax/448 on the ceil grid; W ~= q * s."""
    n, k = w.shape
    gn, gk = math.ceil(n / bn), math.ceil(k / bk)
    blocks = F.pad(w, (0, gk * bk - k, 0, gn * bn - n)).view(gn, bn, gk, bk)  # zero-padded edge blocks
    s = (blocks.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)  # [gn, gk]
    if pow2:  # ue8m0 checkpoints store power-of-two scales
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).to(E4M3).view(gn * bn, gk * bk)[:n, :k]
    return q.contiguous(), s


def dequant_fp8_block(q: torch.Tensor, s: torch.Tensor, bn: int = 128, bk: int = 128) -> torch.Tensor:
    return q.float() * s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: q.shape[0], : q.shape[1]]


def quant_fp8_tensor(w: torch.Tensor):
    """AutoFP8 / ModelOpt per-tensor (§5.1): 0-dim s = amax/448."""
    s = (w.abs().max() / 448).float()
    return (w / s).clamp(-448, 448).to(E4M3), s


def quant_int4_groups(w: torch.Tensor, g: int = 128):
    """Symmetric int4 per 1xG group along K (§6.1/6.2): s = amax/7, q = clamp(round(w/s), -8, 7)."""
    n, k = w.shape
    ng = math.ceil(k / g)
    padded = F.pad(w, (0, ng * g - k))
    s = (padded.view(n, ng, g).abs().amax(dim=-1) / 7).clamp(min=1e-12)  # [N, ng]
    q = torch.round(padded.view(n, ng, g) / s[..., None]).clamp(-8, 7).view(n, -1)[:, :k]
    return q.to(torch.int8), s


def dequant_int4(q: torch.Tensor, s: torch.Tensor, g: int = 128) -> torch.Tensor:
    return q.float() * s.repeat_interleave(g, 1)[:, : q.shape[1]]


def pack_rows_uint8(q: torch.Tensor) -> torch.Tensor:
    """ModelOpt pack_int4_in_uint8: [N, K] signed -> uint8 [N/2, K], row 2j low nibble, 2j+1 high."""
    u = q.to(torch.int16) & 0xF
    return (u[0::2] + u[1::2] * 16).to(torch.uint8)


def pack_k_int8(q: torch.Tensor) -> torch.Tensor:
    """TRT-LLM pack_int8_tensor_to_packed_int4: [N, K] signed -> int8 [N, K/2], even k low nibble."""
    u = q.to(torch.int16) & 0xF
    return (u[:, 0::2] + u[:, 1::2] * 16).to(torch.uint8).view(torch.int8)


# ---- reference-side activation fake quantization -------------------------------------------------

def fake_quant(x: torch.Tensor, granularity: str, scale=None, group: int = 128, ue8m0: bool = False) -> torch.Tensor:
    xq, s = quantize_fp8_ref(x.reshape(-1, x.shape[-1]), granularity, scale, group, ue8m0)
    return dequantize_fp8_act(xq, s, granularity, group).to(x.dtype).reshape(x.shape)


def hook(module: nn.Module, fn) -> None:
    module.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:]))


def linears(hf) -> dict[str, nn.Linear]:
    return {n: m for n, m in hf.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def input_amax(hf, ids: list[int], smooth: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Calibration: amax of every Linear's input (times its pre_quant_scale) over one prompt."""
    amax, handles = {}, []
    for name, lin in linears(hf).items():
        pqs = (smooth or {}).get(name)
        handles.append(lin.register_forward_pre_hook(
            lambda m, a, name=name, pqs=pqs: amax.__setitem__(name, (a[0] if pqs is None else a[0] * pqs).abs().max())))
    with torch.no_grad():
        hf(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return amax


def dump_json(model_dir: str, files: dict[str, dict]) -> None:
    for fname, obj in files.items():
        with open(os.path.join(model_dir, fname), "w") as f:
            json.dump(obj, f, indent=2)


def rewrite(model_dir: str, updates: dict, qcfg: dict | None = None, extra_json: dict | None = None) -> None:
    """Replace tensors in model.safetensors (a `None` value removes one), add quantization_config and json files."""
    path = os.path.join(model_dir, "model.safetensors")
    tensors = {**load_file(path), **{n: t.contiguous() for n, t in updates.items() if t is not None}}
    tensors = {n: t for n, t in tensors.items() if n not in updates or updates[n] is not None}
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    dump_json(model_dir, {"config.json": {**cfg, "quantization_config": qcfg} if qcfg else cfg, **(extra_json or {})})


# ---- checkpoint builders -------------------------------------------------------------------------

def block_fp8_tensors(hf, names, block=(128, 128), ue8m0=False) -> dict:
    out = {}
    for name in names:
        lin = linears(hf)[name]
        q, s = quant_fp8_block(lin.weight.data, *block, pow2=ue8m0)
        out[f"{name}.weight"], out[f"{name}.weight_scale_inv"] = q, s
        lin.weight.data = dequant_fp8_block(q, s, *block)
        hook(lin, lambda x: fake_quant(x, "token_group", group=block[1], ue8m0=ue8m0))
    return out


def write_block_fp8(hf, model_dir, block=(128, 128), ue8m0=False) -> None:
    """DeepSeek-V3 / Qwen3-FP8 layout; modules_to_not_convert lists lm_head and the norms as Qwen does."""
    updates = block_fp8_tensors(hf, list(linears(hf)), block, ue8m0)
    skip = ["lm_head"] + [f"model.layers.{i}.{n}" for i in range(hf.config.num_hidden_layers)
                          for n in ("input_layernorm", "post_attention_layernorm")]
    qcfg = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block),
            "modules_to_not_convert": skip}
    if ue8m0:
        qcfg["scale_fmt"] = "ue8m0"
    rewrite(model_dir, updates, qcfg)


def per_tensor_fp8_tensors(hf, ids, static: bool, input_leaf: str = "input_scale") -> dict:
    amax = input_amax(hf, ids) if static else {}
    out = {}
    for name, lin in linears(hf).items():
        q, s = quant_fp8_tensor(lin.weight.data)
        out[f"{name}.weight"], out[f"{name}.weight_scale"] = q, s
        lin.weight.data = q.float() * s
        a = (amax[name] / 448).float() if static else None
        if static:
            out[f"{name}.{input_leaf}"] = a
        hook(lin, lambda x, a=a: fake_quant(x, "tensor_dynamic" if a is None else "tensor_static", a))
    return out


def write_autofp8(hf, model_dir, ids, static=True, legacy=False, kv_scales=False) -> None:
    """AutoFP8 quantize.py layout: 0-dim weight_scale/input_scale (old exports: act_scale), ignored_layers."""
    updates = per_tensor_fp8_tensors(hf, ids, static, "act_scale" if legacy else "input_scale")
    qcfg = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic", "ignored_layers": ["lm_head"]}
    if kv_scales:  # AutoFP8 kv_cache_scheme static: k_proj/v_proj.output_scale
        updates.update({f"model.layers.{i}.self_attn.{p}.output_scale": torch.tensor(0.02)
                        for i in range(hf.config.num_hidden_layers) for p in ("k_proj", "v_proj")})
        qcfg["kv_cache_scheme"] = "static"
    rewrite(model_dir, updates, qcfg)


def modelopt_json(algo: str, exclude: list[str], kv: str | None = None, **extra) -> tuple[dict, dict]:
    """hf_quant_config.json and config.json quantization_config as ModelOpt's export writes them."""
    producer = {"name": "modelopt", "version": "0.37.0"}
    hfq = {"producer": producer, "quantization": {"quant_algo": algo, "kv_cache_quant_algo": kv, **extra,
                                                  "exclude_modules": exclude}}
    qcfg = {"ignore": exclude, "quant_algo": algo, "producer": producer, "quant_method": "modelopt"}
    if algo == "FP8":
        qcfg["config_groups"] = {"group_0": {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                                             "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                                             "targets": ["Linear"]}}
    if kv:
        qcfg["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return hfq, qcfg


def write_modelopt_fp8(hf, model_dir, ids) -> None:
    updates = per_tensor_fp8_tensors(hf, ids, static=True)
    updates.update({f"model.layers.{i}.self_attn.{p}_proj.{p}_scale": torch.tensor(0.03)
                    for i in range(hf.config.num_hidden_layers) for p in "kv"})
    hfq, qcfg = modelopt_json("FP8", ["lm_head"], kv="FP8")
    rewrite(model_dir, updates, qcfg, {"hf_quant_config.json": hfq})


def write_modelopt_w4a8(hf, model_dir, ids, smoothed=("o_proj", "down_proj")) -> dict:
    """ModelOpt W4A8_AWQ: pre_quant_scale only where AWQ smoothing is not folded into a norm (o_proj, down_proj).
    Returns the on-disk tensors written, for the writer test."""
    gen = torch.Generator().manual_seed(7)
    mods = linears(hf)
    smooth = {n: (0.5 + torch.rand(m.in_features, generator=gen)) for n, m in mods.items()
              if n.rsplit(".", 1)[1] in smoothed}
    amax = input_amax(hf, ids, smooth)
    updates = {}
    for name, lin in mods.items():
        pqs = smooth.get(name)
        w = lin.weight.data / pqs if pqs is not None else lin.weight.data  # AWQ: W * diag(1/s), x * s
        q, s = quant_int4_groups(w)
        a = (amax[name] / 448).float()
        updates.update({f"{name}.weight": pack_rows_uint8(q), f"{name}.weight_scale": s,
                        f"{name}.weight_scale_2": (w.abs().max() / 448).float(), f"{name}.input_scale": a})
        if pqs is not None:
            updates[f"{name}.pre_quant_scale"] = pqs
        lin.weight.data = dequant_int4(q, s)
        hook(lin, lambda x, a=a, p=pqs: fake_quant(x if p is None else x * p, "tensor_static", a))
    hfq, qcfg = modelopt_json("W4A8_AWQ", ["lm_head"], group_size=128, has_zero_point=False, pre_quant_scale=True)
    rewrite(model_dir, updates, qcfg, {"hf_quant_config.json": hfq})
    return updates


def w4afp8_expert_tensors(prefix: str, w: torch.Tensor):
    """TRT-LLM quantize_mixed_precision_moe.py per routed-expert projection (int4 along K + weight_scale_inv):
    (on-disk tensors, signed q [N, K], scales [N, K/128])."""
    q, s = quant_int4_groups(w)
    return {f"{prefix}.weight": pack_k_int8(q), f"{prefix}.weight_scale_inv": s}, q, s


def write_w4afp8_dense(hf, model_dir, ids) -> None:
    """DeepSeek W4AFP8 MIXED_PRECISION on a dense stand-in: attention block fp8, MLP int4-along-K W4A8 with
    per-module input_scale [1], quant_cfg.json naming the fused modules as TRT-LLM's script does (here the
    dense `mlp.gate_up_proj`/`down_proj` are mapped to W4A8_AWQ where DeepSeek maps `mlp.experts`)."""
    mods = linears(hf)
    attn = [n for n in mods if ".self_attn." in n]
    updates = block_fp8_tensors(hf, attn)
    amax = input_amax(hf, ids)
    for name in (n for n in mods if ".mlp." in n):
        lin = mods[name]
        packed, q, s = w4afp8_expert_tensors(name, lin.weight.data)
        a = (amax[name] / 448).float().reshape(1)
        updates.update({**packed, f"{name}.input_scale": a})
        lin.weight.data = dequant_int4(q, s)
        hook(lin, lambda x, a=a: fake_quant(x, "tensor_static", a))
    kinds = {"self_attn.qkv_proj": "FP8_BLOCK_SCALES", "self_attn.o_proj": "FP8_BLOCK_SCALES",
             "mlp.gate_up_proj": "W4A8_AWQ", "mlp.down_proj": "W4A8_AWQ"}
    layers = {f"model.layers.{i}.{m}": {"quant_algo": a} for i in range(hf.config.num_hidden_layers)
              for m, a in kinds.items()}
    quant_cfg = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}
    hfq = {"quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None}}
    rewrite(model_dir, updates, extra_json={"hf_quant_config.json": hfq, "quant_cfg.json": quant_cfg})


# ---- checks shared by the test files -------------------------------------------------------------

_gen = torch.Generator().manual_seed(1)
PROMPT = torch.randint(3, VOCAB, (13,), generator=_gen).tolist()  # also the calibration prompt
CONT = torch.randint(3, VOCAB, (3,), generator=_gen).tolist()


def assert_logits_match(model_dir: str, hf, rtol: float = 1e-4) -> None:
    """lowbit (CPU, reference backend, paged KV) prefill + decode steps against the HF reference. Both see the same
    dequantized weights and fp8 activation rounding, so the budget is float32 summation order only (observed
    ~3e-7); quantizing the weights alone moves these logits by 1e-1 or more."""
    from tests.helpers import Stepper, hf_incremental_logits

    stepper = Stepper(model_dir)
    seq = stepper.add(PROMPT)
    got = [stepper.step({seq.seq_id: c})[seq.seq_id] for c in CONT] + [stepper.step()[seq.seq_id]]
    want = hf_incremental_logits(hf, PROMPT, CONT)
    for i, (g, w) in enumerate(zip(got, want)):
        rel = ((g - w).norm() / w.norm()).item()
        assert rel < rtol, f"{model_dir}: step {i}: relative logit error {rel:.3g}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_canonical(a, b) -> None:
    """Two read_canonical results hold the same schemes and bit-identical tensors (dtype and shape included)."""
    def same(t, u, what):
        assert (t.dtype, t.shape) == (u.dtype, u.shape) and torch.equal(bits(t), bits(u)), what

    (mods_a, plain_a), (mods_b, plain_b) = a, b
    assert sorted(mods_a) == sorted(mods_b) and sorted(plain_a) == sorted(plain_b)
    for prefix, mod in mods_a.items():
        other = mods_b[prefix]
        assert mod.scheme == other.scheme and sorted(mod.tensors) == sorted(other.tensors), prefix
        for leaf, t in mod.tensors.items():
            same(t, other.tensors[leaf], f"{prefix}.{leaf}")
    for name, t in plain_a.items():
        same(t, plain_b[name], name)


def synthetic_dir(path, tensors: dict, qcfg: dict | None = None, extra_json: dict | None = None, **config) -> str:
    """A checkpoint directory holding only the given tensors (tensor-level reader tests, no loadable model)."""
    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 192,
           "num_hidden_layers": 1, "num_attention_heads": 4, **config}
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    dump_json(str(path), {"config.json": cfg, **(extra_json or {})})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return str(path)
