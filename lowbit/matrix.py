"""`lowbit matrix`: the live support matrix, generated — never hand-written.

Columns are kernel families (QuantScheme.name); for each: the ordered backend list from
lowbit.layers.selection (name, minimum GPU architecture, GPU test status read from bench/results),
activation and weight formats. Rows are model families from the model registry: S where the family
has an architecture lowbit implements and the scheme has a GPU backend, S(ref) where only the
reference path serves it, N where the family is not implemented yet.
"""

from __future__ import annotations

import glob
import json
import os

FAMILIES = {
    "llama": ("LlamaForCausalLM", "MistralForCausalLM"),
    "qwen dense": ("Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    "qwen moe": ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"),
    "deepseek / kimi": ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"),
}

SCHEMES = {  # family -> (activations, weights)
    "w4a16": ("fp16 / bf16", "int4 group-wise (G 32/64/128, channel), sym/asym, act-order"),
    "w8a16": ("fp16 / bf16", "int8 group-wise / channel-wise"),
    "w4a8": ("fp8 per-tensor static / per-token-group 128", "int4 group-wise (G 128), symmetric"),
    "w8a8_fp8": ("fp8 per-tensor static or dynamic / per-token", "fp8 per-tensor / per-channel"),
    "w8a8_fp8_block": ("fp8 per-token-group 128", "fp8 block-wise 128x128"),
}

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def gpu_test_status(results_dir: str = RESULTS) -> dict[str, list[str]]:
    """test file -> ["h100: 40 passed @abc123", ...] from bench/results/*.json `gpu_tests` sections."""
    status: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        section = data.get("gpu_tests") if isinstance(data, dict) else None
        if not section:
            continue
        gpu = os.path.splitext(os.path.basename(path))[0]
        for test_file, r in section.get("files", {}).items():
            failed = f", {r['failed']} failed" if r.get("failed") else ""
            status.setdefault(test_file, []).append(f"{gpu}: {r.get('passed', 0)} passed{failed} @{section.get('commit', '?')}")
    return status


def build_matrix(results_dir: str = RESULTS) -> dict:
    from lowbit.layers.selection import backends_for
    from lowbit.models.registry import MODEL_REGISTRY

    tested = gpu_test_status(results_dir)
    columns = {}
    for fam, (acts, weights) in SCHEMES.items():
        backends = []
        for b in backends_for(fam):
            arch = "cpu+gpu" if b.min_capability is None else "sm" + "".join(map(str, b.min_capability))
            tests = getattr(b, "tests", None)
            backends.append({"name": b.name, "min_arch": arch, "gpu_tested": tested.get(tests, []) if tests else []})
        gpu = [b for b in backends if b["min_arch"] != "cpu+gpu"]
        columns[fam] = {
            "gemm_backends": backends,
            "moe_operator": None,
            "min_arch": min((b["min_arch"] for b in gpu), default="any"),
            "activations": acts,
            "weights": weights,
            "families": {
                name: ("S" if gpu else "S(ref)") if any(a in MODEL_REGISTRY for a in archs) else "N"
                for name, archs in FAMILIES.items()
            },
        }
    return columns


def to_markdown(columns: dict) -> str:
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label, cells):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("GEMM backends (in order)", [", ".join(f"{b['name']} ({b['min_arch']})" for b in columns[n]["gemm_backends"])
                                     for n in names])
    row("MoE operator", [columns[n]["moe_operator"] or "—" for n in names])
    row("min arch (GPU)", [columns[n]["min_arch"] for n in names])
    row("activations", [columns[n]["activations"] for n in names])
    row("weights", [columns[n]["weights"] for n in names])
    for fam in FAMILIES:
        row(fam, [columns[n]["families"][fam] for n in names])
    tested = sorted({f"{b['name']}: {t}" for n in names for b in columns[n]["gemm_backends"] for t in b["gpu_tested"]})
    out = "\n".join(lines)
    out += "\n\nS = GPU kernel + reference path; S(ref) = reference path only (any device); N = model family not implemented."
    if tested:
        out += "\n\nGPU test results (bench/results):\n" + "\n".join(f"- {t}" for t in tested)
    return out


def add_arguments(p) -> None:
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")


def run(args) -> int:
    columns = build_matrix()
    print(json.dumps(columns, indent=1) if args.format == "json" else to_markdown(columns))
    return 0
