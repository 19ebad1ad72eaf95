"""Shared benchmark plumbing: timing, the rooflines measured in the same run, results on disk.

Every kernel benchmark reports time, achieved GB/s and TFLOP/s, the fraction of the measured HBM
roofline, and the peers measured in the same process. Results go to bench/results/<gpu>.json
(merged by section, with the commit that was measured) and a PNG plot next to it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in ms, with the L2 flushed between runs (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


ROTATE_BYTES = 160 * 2**20  # distinct bytes per timed graph: > 3x the 50 MB L2 of an H100, so weights come from HBM


def copies_for(nbytes: int, cap: int = 16) -> int:
    """How many copies of an operand of `nbytes` to rotate through so the timed loop is not served from L2."""
    return max(1, min(cap, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def capture_graph(fns: list[Callable[[], object]], rounds: int) -> tuple[torch.cuda.CUDAGraph, int]:
    """One CUDA graph of `fns` called round-robin `rounds` times (after a warm-up outside the capture, where first
    calls compile); returns it with its number of calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    return graph, rounds * len(fns)


def replay_us(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    """Microseconds per call of one replay of a graph of `calls` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def graph_replay_us(fns: list[Callable[[], object]], rounds: int, reps: int = 5) -> float:
    """Median per-call microseconds of `fns` called round-robin `rounds` times from one CUDA graph (no launch gaps)."""
    graph, calls = capture_graph(fns, rounds)
    times = sorted(replay_us(graph, calls) for _ in range(reps))
    del graph
    return times[len(times) // 2]


class Interleaved:
    """Times several groups of callables against each other: each group is captured into its own CUDA graph
    (calls round-robin over the group, `rounds(fns)` times), then the graphs are replayed in turn, A B C, B C A,
    C A B, ... `reps` times, and each group gets the median of its replays. Clock and power drift then falls on
    every group alike; timed one after the other, the same cuBLAS block-wise call on 7168x16384 at M = 2048 measured
    432 and 370 us a few seconds apart (H100, bench/results/h100.json fp8_gemm), which decides a ratio target.

        t = Interleaved(rounds); t.add("us", fns); t.add("bf16_us", peer_fns); r.update(t.run())
    A group that raises while warming up or capturing is reported as skipped and comes back as None."""

    def __init__(self, rounds: Callable[[list], int], reps: int = 7):
        self.rounds, self.reps, self.groups = rounds, reps, {}

    def add(self, name: str, fns: list[Callable[[], object]]) -> None:
        self.groups[name] = fns

    def run(self) -> dict[str, float | None]:
        graphs = {}
        for name, fns in self.groups.items():
            try:
                graphs[name] = capture_graph(fns, max(1, self.rounds(fns)))
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run this shape is recorded as missing
                print(f"    skipped {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
                torch.cuda.synchronize()
        names = list(graphs)
        times = {name: [] for name in names}
        for rep in range(self.reps if names else 0):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name].append(replay_us(*graphs[name]))
        del graphs
        order, self.groups = list(self.groups), {}
        return {name: sorted(times[name])[len(times[name]) // 2] if times.get(name) else None for name in order}


def bench_graph_ms(fn: Callable[[], object], iters: int = 20, reps: int = 5) -> float:
    """Median per-call time of fn() in ms, replayed from a CUDA graph of `iters` calls."""
    return graph_replay_us([fn], iters, reps) / 1e3


def measure_copy_gbps(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def measure_bf16_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_fp8_tflops(n: int = 8192) -> float | None:
    if torch.cuda.get_device_capability() < (8, 9):
        return None
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    ms = bench_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def rooflines() -> dict:
    return {
        "copy_GBps": round(measure_copy_gbps(), 1),
        "bf16_TFLOPs": round(measure_bf16_tflops(), 1),
        "fp8_TFLOPs": (lambda v: round(v, 1) if v else None)(measure_fp8_tflops()),
    }


def parse_shapes(text: str | None) -> list[tuple[int, int]] | None:
    """"2112x7168,4096x7168" -> [(2112, 7168), (4096, 7168)] (the --shapes option of the tuning commands)."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")] if text else None


def gpu_name() -> str:
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if key in name:
            return key
    return name.replace(" ", "_")


def git_commit() -> str:
    """LOWBIT_COMMIT when set (the device machine's copy of the tree carries a stale .git), else git's HEAD."""
    if os.environ.get("LOWBIT_COMMIT"):
        return os.environ["LOWBIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LOWBIT_COMMIT", "unknown")


def save_section(section: str, payload: dict, out_dir: str | None = None) -> str:
    """Merge `payload` under `section` into <out_dir>/<gpu>.json; returns the path."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{gpu_name()}.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    payload = dict(payload)
    payload.update(commit=git_commit(), device=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M:%S"))
    data[section] = payload
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)
