"""Launch configs for w4a16_gemm: tuned tables per GPU (data), a heuristic for the rest, opt-in autotuning.

A config is a dict:
  {"path": "fused", "BLOCK_N", "BLOCK_M", "SPLIT_K", "SCALE_AFTER", "num_warps", "num_stages"[, "GROUP_M"]},
  {"path": "wgmma", "BLOCK_N", "BLOCK_M", "num_warps", "num_stages", "GROUP_M", "RS"[, "SPLIT_K", "TAIL_SPLIT",
  "STREAM_K"]} (sm90, w4a16_wgmma.py),
  {"path": "tma", "BLOCK_N", "BLOCK_M", "SWAP", "num_warps", "num_stages", "GROUP_M"} (w4a16_tma.py),
  or {"path": "dequant"[, "chunks", "overlap"]} (dequantize to x.dtype, then cuBLAS; see w4a16_dequant.py).
Lookup for (weights, M): the weights' own cache -> configs/w4a16_<gpu>.json (checked in; written by
`python -m bench.kernels.w4a16 --tune`) merged with the user's autotune cache -> heuristic.
Keys: shape "NxK:int<b>" (tuned on group 128; the tile choice hardly depends on G), then the M bucket
(next power of two, <= 16384); a bucket the table lacks takes the nearest tuned bucket of that shape.
With LOWBIT_W4A16_AUTOTUNE=1 a missing shape is timed once per bucket on first use (never while a CUDA
graph is captured) and written to $LOWBIT_CACHE/w4a16_<gpu>.json.
"""

from __future__ import annotations

import functools
import json
import os

import torch

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
TABLE_ALIASES = {"h200": "h100"}  # same SM (sm90, 132 SMs): its shapes serve where the GPU's own table has none
MAX_BUCKET = 16384


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def bucket(m: int) -> int:
    return min(MAX_BUCKET, 1 << max(0, (m - 1).bit_length()))


def shape_key(w) -> str:
    return f"{w.n}x{w.k}:int{w.bits}"


def nearest(per_m: dict, b: int) -> dict | None:
    """The config of bucket b, else of the tuned bucket closest to it in log2 (ties: the smaller)."""
    if str(b) in per_m or not per_m:
        return per_m.get(str(b))
    near = min((int(t) for t in per_m), key=lambda t: (abs(t.bit_length() - b.bit_length()), t))
    return per_m[str(near)]


def gpu_key(device) -> str:
    if interpreting() or torch.device(device).type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if key in name:
            return key
    return name.replace(" ", "_")


def user_cache_path(gpu: str) -> str:
    root = os.environ.get("LOWBIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lowbit"))
    return os.path.join(root, f"w4a16_{gpu}.json")


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f).get("configs", {})
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=None)
def load_table(gpu: str) -> dict:
    """Checked-in table for this GPU, the shapes it lacks taken whole from its alias's table (an H200 has the H100's
    SMs, so an H100-tuned entry stands in for the untuned heuristic there; not measured on an H200), overlaid with the
    user's autotune cache. Read-only."""
    table = _read(os.path.join(CONFIG_DIR, f"w4a16_{gpu}.json"))
    if gpu in TABLE_ALIASES:
        for shape, per_m in _read(os.path.join(CONFIG_DIR, f"w4a16_{TABLE_ALIASES[gpu]}.json")).items():
            table.setdefault(shape, per_m)
    for shape, per_m in _read(user_cache_path(gpu)).items():
        table.setdefault(shape, {}).update(per_m)
    return table


def num_sms(device) -> int:
    if interpreting() or torch.device(device).type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(w, tiles: int, device, cap: int = 16) -> int:
    """Split K until the grid covers every SM about four times (small grids only)."""
    return max(1, min(cap, w.k_pad // w.block_k, (4 * num_sms(device)) // max(tiles, 1)))


def heuristic(w, m: int, device) -> dict:
    """Untuned default: split-K streaming for small M; for mid M the sm90 wgmma kernel (split when few tiles),
    elsewhere 128x128 fused tiles; dequant + cuBLAS for large M (what the H100 tables pick on most shapes)."""
    if m <= 64:
        block_m = max(16, bucket(m))
        block_n = 64
        tiles = -(-w.n // block_n) * -(-m // block_m)
        return {"path": "fused", "BLOCK_N": block_n, "BLOCK_M": block_m, "SPLIT_K": _split_for(w, tiles, device),
                "SCALE_AFTER": True, "num_warps": 4, "num_stages": 3}
    if m >= 2048:
        return {"path": "dequant"}
    if wgmma_ok(w, device):  # the H100 table's usual winners at M = 128..1024 (16 of 16 shapes at 128 and 256);
        # on six shapes the table lacks (7168x2048 .. 57344x8192) 1.3-2.2x faster than the fused 128x128 tiles (H100)
        block_m = 128 if m <= 128 else 256
        tiles = -(-w.n // 128) * -(-m // block_m)  # one CTA per SM: split K only up to about one wave
        split = max(1, min(4, w.k_pad // w.block_k, num_sms(device) // max(tiles, 1)))
        return {"path": "wgmma", "BLOCK_N": 128, "BLOCK_M": block_m, "num_warps": 8, "GROUP_M": 8, "RS": True,
                "num_stages": 4 if block_m == 128 else 3, "SPLIT_K": split, "TAIL_SPLIT": True}
    tiles = -(-w.n // 128) * -(-m // 128)
    split = _split_for(w, tiles, device, cap=4) if tiles < num_sms(device) else 1
    return {"path": "fused", "BLOCK_N": 128, "BLOCK_M": 128, "SPLIT_K": split, "SCALE_AFTER": False,
            "num_warps": 8, "num_stages": 3}


@functools.lru_cache(maxsize=None)
def _gluon() -> bool:
    try:
        import triton.experimental.gluon  # noqa: F401
        return True
    except ImportError:
        return False


def wgmma_ok(w, device) -> bool:
    """Weights and device the wgmma kernel (w4a16_wgmma.py) walks: sm90, 4-bit, groups of whole K-blocks (or
    per-channel), with Gluon installed."""
    dev = torch.device(device)
    return (dev.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(dev)[0] == 9
            and w.bits == 4 and (w.gk == 0 or w.gk % w.block_k == 0) and _gluon())


def select_config(w, m: int, dtype: torch.dtype, device) -> dict:
    b = bucket(m)
    cfg = w.configs.get((b, dtype))
    if cfg is not None:
        return cfg
    gpu = gpu_key(device)
    per_m = load_table(gpu).get(shape_key(w), {})
    cfg = nearest(per_m, b)
    if str(b) not in per_m and os.environ.get("LOWBIT_W4A16_AUTOTUNE") == "1" and gpu != "cpu" \
            and not torch.cuda.is_current_stream_capturing():
        cfg = autotune(w, b, dtype, device)
        save_user_config(gpu, shape_key(w), b, cfg)
        load_table.cache_clear()
    cfg = cfg or heuristic(w, m, device)
    w.configs[(b, dtype)] = cfg
    return cfg


LARGE_TILES = (  # BLOCK_N, BLOCK_M, num_warps, num_stages, SCALE_AFTER (the winners of a wider first sweep)
    (128, 64, 4, 4, True), (128, 128, 8, 3, False), (128, 128, 8, 4, True), (128, 256, 8, 3, False),
    (64, 128, 4, 4, False))


# wgmma kernel (A in registers, 4 warps per 64 rows of N): BLOCK_N, BLOCK_M, stages; BLOCK_N = 64 is one warpgroup,
# two CTAs per SM (~165 registers, <= 110 KB shared), which won at M = 64..256 on the small H100 shapes
SM90_TILES = ((128, 64, 4), (128, 128, 4), (128, 256, 3), (64, 64, 4), (64, 64, 3))


def candidates(w, m: int, device) -> list[dict]:
    """The search space autotune walks for one M bucket (kept small: each distinct tile compiles once)."""
    num_kb = w.k_pad // w.block_k
    sms = num_sms(device)
    out = []
    if m <= 64:
        block_m = max(16, bucket(m))
        for block_n in (64, 128):
            tiles = -(-w.n // block_n) * -(-m // block_m)
            for split in sorted({1, 2, 4, 8, 16} | {_split_for(w, tiles, device)}):
                if split <= num_kb:  # 3 stages won every small-M case of the first H100 sweep
                    out.append({"path": "fused", "BLOCK_N": block_n, "BLOCK_M": block_m, "SPLIT_K": split,
                                "SCALE_AFTER": True, "num_warps": 4, "num_stages": 3})
        return out
    for block_n, block_m, warps, stages, after in LARGE_TILES:
        if block_m > 2 * bucket(m):
            continue
        tiles = -(-w.n // block_n) * -(-m // block_m)
        splits = [1] + ([s for s in (2, 3, 4) if s <= num_kb and tiles * s <= 3 * sms] if tiles < sms else [])
        for split in splits:
            out.append({"path": "fused", "BLOCK_N": block_n, "BLOCK_M": block_m, "SPLIT_K": split,
                        "SCALE_AFTER": after, "num_warps": warps, "num_stages": stages})
    if m >= 256:
        out.append({"path": "dequant"})
    if m >= 4096:  # N-chunks, the next one dequantized on a side stream while cuBLAS multiplies this one
        out += [{"path": "dequant", "chunks": c, "overlap": True} for c in (2, 4, 8)]
    if torch.device(device).type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] == 9:
        for bn, bm, st in SM90_TILES:
            if bm > 2 * bucket(m) or (bn == 64 and m > 256):
                continue
            tiles = -(-w.n // bn) * -(-m // bm)
            resident = sms * (2 if bn == 64 else 1)  # split-K only where the tiles leave resident CTA slots idle
            base = {"path": "wgmma", "BLOCK_N": bn, "BLOCK_M": bm, "num_warps": bn // 16, "num_stages": st,
                    "GROUP_M": 8, "RS": True}
            for split in [1] + [s for s in (2, 3, 4, 6, 8) if tiles < resident and tiles * s <= 2 * resident
                                and num_kb >= 3 * s]:
                out.append(dict(base, SPLIT_K=split))
            if tiles > resident:  # the last partial wave's tiles split over K (w4a16_wgmma.tail_split)
                out.append(dict(base, SPLIT_K=1, TAIL_SPLIT=True))
            elif bm <= 128:  # fewer tiles than CTA slots: stream-K (w4a16_wgmma.stream_k)
                out.append(dict(base, SPLIT_K=1, STREAM_K=True))
        out.append({"path": "tma", "BLOCK_N": 128, "BLOCK_M": 128, "SWAP": True, "num_warps": 8, "num_stages": 3,
                    "GROUP_M": 8})
    return out


def autotune(w, m: int, dtype: torch.dtype, device, configs: list[dict] | None = None,
             timer=None) -> dict:
    """Time each candidate on random x [m, K] and return the fastest (failures to compile are skipped)."""
    import triton.testing

    from lowbit.kernels.w4a16 import w4a16_gemm

    x = torch.randn((m, w.k), dtype=dtype, device=device)
    timer = timer or (lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    best, best_ms = None, float("inf")
    for cfg in configs or candidates(w, m, device):
        try:
            ms = timer(lambda: w4a16_gemm(x, w, config=cfg))
        except Exception:  # noqa: BLE001 - a config that does not compile or fit is just not a candidate
            continue
        if ms < best_ms:
            best, best_ms = dict(cfg), ms
    if best is None:
        raise RuntimeError(f"w4a16 autotune: no candidate ran for {shape_key(w)} M={m}")
    best["us"] = round(best_ms * 1e3, 2)
    return best


def save_user_config(gpu: str, shape: str, b: int, cfg: dict) -> None:
    path = user_cache_path(gpu)
    data = {"configs": _read(path)}
    data["configs"].setdefault(shape, {})[str(b)] = cfg
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
