"""Independent GPTQ/AWQ fixtures for the format tests: a round-to-nearest quantizer and packers written
from the documented on-disk layouts (/work/shared/reference/formats.md §1 GPTQ, §2 AWQ), not from lowbit.

AutoGPTQ, GPTQModel and AutoAWQ need CUDA builds, so their checkpoints are re-created here bit by bit:
  GPTQ qweight [K/P, N]: word (r, n) holds W-rows r*P + j at bits b*j; qzeros [K/G, N/P]: columns c*P + j
  at bits b*j, v1 storing zero-1; AWQ qweight [K, N/8] / qzeros: slot i holds column 8c + ORDER[i].
Everything works in numpy with explicit shifts so no lowbit packing code is exercised by the fixtures.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ awq/utils/packing_utils.py


def pack_last(vals, bits: int, order=None) -> torch.Tensor:
    """[R, C] ints -> int32 [R, C/P]; word w, slot i (bits b*i) holds column P*w + i, or P*w + order[i]."""
    vals = np.asarray(vals, dtype=np.int64)
    per, mask = 32 // bits, (1 << bits) - 1
    r, c = vals.shape
    assert c % per == 0, (c, per)
    v = vals.reshape(r, c // per, per)
    words = np.zeros((r, c // per), dtype=np.uint64)
    for slot in range(per):
        col = slot if order is None else order[slot]
        words |= ((v[:, :, col] & mask).astype(np.uint64)) << np.uint64(bits * slot)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def unpack_last(words, bits: int, order=None) -> np.ndarray:
    words = (np.asarray(words, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint64)  # int32 bits as unsigned
    per, mask = 32 // bits, (1 << bits) - 1
    out = np.zeros(words.shape + (per,), dtype=np.int64)
    for slot in range(per):
        col = slot if order is None else order[slot]
        out[..., col] = (words >> np.uint64(bits * slot)) & np.uint64(mask)
    return out.reshape(words.shape[0], -1)


def act_order_g_idx(k: int, group: int, seed: int = 0) -> torch.Tensor:
    """AutoGPTQ desc_act: groups are formed in a permuted column order, g_idx[k] = position(k) // G."""
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g = torch.empty(k, dtype=torch.int32)
    g[perm] = (torch.arange(k) // group).int()
    return g


def rtn(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx=None, min_zero: int = 0):
    """Round-to-nearest: (q [N, K], scales [N, Gn] fp16-exact float32, zeros [N, Gn], g_idx [K])."""
    n, k = w.shape
    g = group if group > 0 else k
    g_idx = (torch.arange(k) // g).int() if g_idx is None else g_idx
    gn, maxq = k // g, 2**bits - 1
    q = torch.zeros(n, k, dtype=torch.int64)
    scales, zeros = torch.zeros(n, gn), torch.zeros(n, gn, dtype=torch.int64)
    for gi in range(gn):
        cols = (g_idx == gi).nonzero().flatten()
        x = w[:, cols]
        if sym:  # AutoGPTQ quantizer.py: scale = 2 absmax / maxq, zero = (maxq + 1) / 2
            s = (2 * x.abs().amax(1) / maxq).clamp(min=1e-5).half().float()
            z = torch.full((n,), 2 ** (bits - 1), dtype=torch.int64)
        else:
            lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
            s = ((hi - lo) / maxq).clamp(min=1e-5).half().float()
            z = torch.round(-lo / s).long().clamp(min_zero, maxq)
        q[:, cols] = torch.clamp(torch.round(x / s[:, None]).long() + z[:, None], 0, maxq)
        scales[:, gi], zeros[:, gi] = s, z
    return q, scales, zeros, g_idx


def dequant(q, scales, zeros, g_idx) -> torch.Tensor:
    g = g_idx.long()
    return (q - zeros[:, g]).float() * scales[:, g]


def gptq_tensors(q, scales, zeros, g_idx, bits: int, fmt: str = "gptq") -> dict[str, torch.Tensor]:
    """On-disk GPTQ tensors of one module (v1 `gptq` stores zero - 1)."""
    return {
        "qweight": pack_last(q.numpy(), bits).t().contiguous(),  # [K/P, N]: packed along K
        "qzeros": pack_last(zeros.t().numpy() - (1 if fmt == "gptq" else 0), bits),  # [Gn, N/P]
        "scales": scales.t().contiguous().half(),  # [Gn, N]
        "g_idx": g_idx.int(),
    }


def awq_tensors(q, scales, zeros) -> dict[str, torch.Tensor]:
    return {
        "qweight": pack_last(q.t().numpy(), 4, AWQ_ORDER),  # [K, N/8]: packed along N, interleaved
        "qzeros": pack_last(zeros.t().numpy(), 4, AWQ_ORDER),  # [Gn, N/8]
        "scales": scales.t().contiguous().half(),
    }


def write_dir(model_dir: str, tensors: dict[str, torch.Tensor], quant_cfg: dict | None, config: dict | None = None,
              legacy: tuple[str, dict] | None = None) -> None:
    """Replace the weights of a model dir (or create one) and set config.json's quantization_config."""
    from safetensors.torch import save_file

    os.makedirs(model_dir, exist_ok=True)
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(model_dir, f))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(model_dir, "model.safetensors"),
              metadata={"format": "pt"})
    path = os.path.join(model_dir, "config.json")
    if config is None:
        with open(path) as f:
            config = json.load(f)
    config = dict(config)
    config.pop("quantization_config", None)
    if quant_cfg is not None:
        config["quantization_config"] = quant_cfg
    with open(path, "w") as f:
        json.dump(config, f)
    if legacy:
        with open(os.path.join(model_dir, legacy[0]), "w") as f:
            json.dump(legacy[1], f)


TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantize_hf_model(hf, model_dir: str, pick, pack) -> dict[str, torch.Tensor]:
    """Quantize the decoder Linears (and lm_head) that `pick(prefix)` returns settings for; write on-disk tensors
    with `pack(q, scales, zeros, g_idx, settings)`; put the dequantized weights back into `hf` (the reference)."""
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {}
    prefixes = [f"model.layers.{i}.{m}" for i in range(hf.config.num_hidden_layers) for m in LINEARS] + ["lm_head"]
    for prefix in prefixes:
        settings = pick(prefix)
        if settings is None or f"{prefix}.weight" not in state:
            continue
        w = state.pop(f"{prefix}.weight").float()
        g_idx_fn = settings.get("g_idx_fn", lambda k, g, seed: None)  # act-order: a different g_idx per module
        g_idx = g_idx_fn(w.shape[1], settings["group_size"], zlib.crc32(prefix.encode()))
        q, scales, zeros, g_idx = rtn(w, settings["bits"], settings["group_size"], settings["sym"], g_idx,
                                     settings.get("min_zero", 0))
        with torch.no_grad():
            hf.get_submodule(prefix).weight.copy_(dequant(q, scales, zeros, g_idx))
        out.update({f"{prefix}.{k}": v for k, v in pack(q, scales, zeros, g_idx, settings).items()})
    out.update(state)
    return out


def compare_with_hf(model_dir: str, hf, atol: float = 1e-3, decode_steps: int = 2) -> float:
    """lowbit (reference backend, fp32 CPU) vs transformers on the dequantized weights: prefill + decode."""
    from tests.helpers import VOCAB, Stepper, hf_incremental_logits

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 9)]
    conts = [torch.randint(3, VOCAB, (decode_steps,), generator=gen).tolist() for _ in prompts]
    stepper = Stepper(model_dir)
    seqs = [stepper.add(p) for p in prompts]
    got = {s.seq_id: [] for s in seqs}
    for step in range(decode_steps + 1):
        forced = {s.seq_id: c[step] for s, c in zip(seqs, conts) if step < decode_steps}
        for sid, row in stepper.step(forced).items():
            got[sid].append(row)
    worst = 0.0
    for seq, prompt, cont in zip(seqs, prompts, conts):
        for g, w in zip(got[seq.seq_id], hf_incremental_logits(hf, prompt, cont)):
            worst = max(worst, (g - w).abs().max().item())
    assert worst < atol, f"{model_dir}: max abs logit diff {worst:.3g} vs transformers on dequantized weights"
    return worst
