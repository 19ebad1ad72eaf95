"""The end-of-run summary: time, per-layer reconstruction error (vs RTN on the same inputs), sizes."""

from __future__ import annotations

import statistics

from lowbit.quant.pipeline import QuantResult


def error_summary(reports) -> dict:
    errs = [r.error for r in reports if r.error is not None]
    pairs = [(r.error, r.rtn_error) for r in reports if r.error is not None and r.rtn_error is not None]
    out = {"linears": len(reports), "with_error": len(errs)}
    if errs:
        out.update(mean_error=statistics.fmean(errs), max_error=max(errs))
    if pairs:
        mean_rtn = statistics.fmean(p[1] for p in pairs)
        out.update(mean_rtn_error=mean_rtn,
                   below_rtn_fraction=sum(e < r for e, r in pairs) / len(pairs),
                   mean_reduction_vs_rtn=1 - out["mean_error"] / mean_rtn if mean_rtn else 0.0,
                   mean_ratio_vs_rtn=statistics.fmean(e / r for e, r in pairs if r > 0))
    return out


def build_report(result: QuantResult, model_dir: str, out_dir: str | None, fmt: str | None,
                 size_before: int | None = None, size_after: int | None = None) -> dict:
    return {
        "model": model_dir,
        "out": out_dir,
        "scheme": result.recipe.name,
        "quant_scheme": result.recipe.scheme.describe(),
        "format": fmt,
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "size_before_bytes": size_before,
        "size_after_bytes": size_after,
        "ignored": result.ignore,
        "summary": error_summary(result.reports),
        "notes": result.notes,
        "layers": [{"name": r.name, "shape": list(r.shape), "error": r.error, "rtn_error": r.rtn_error,
                    **({"tokens": r.tokens} if r.tokens is not None else {}),
                    **({"note": r.note} if r.note else {})} for r in result.reports],
    }


def _mb(n):
    return f"{n / 2**20:.1f} MiB" if n is not None else "?"


def print_summary(report: dict) -> None:
    s = report["summary"]
    print(f"lowbit quantize: {report['scheme']} ({report['quant_scheme']}) -> {report['out']} [{report['format']}]")
    print("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items()))
    print(f"  linears quantized: {s['linears']}, left 16-bit: {len(report['ignored'])}")
    if "mean_error" in s:
        line = f"  output error ||WX-QX||^2/||WX||^2: mean {s['mean_error']:.3e}, max {s['max_error']:.3e}"
        if "mean_rtn_error" in s:
            line += (f"; RTN on the same inputs {s['mean_rtn_error']:.3e} ({s['mean_reduction_vs_rtn']:.0%} lower, "
                     f"below RTN on {s['below_rtn_fraction']:.0%} of linears)")
        print(line)
    fallback = [l["name"] for l in report["layers"] if l.get("note", "").startswith("RTN fallback")]
    if fallback:
        print(f"  RTN fallback (too few calibration tokens reached them): {len(fallback)} linears, e.g. {fallback[0]}")
    experts = [l for l in report["layers"] if ".experts." in l["name"] and "tokens" in l]
    if experts:
        toks = sorted(l["tokens"] for l in experts)
        print(f"  MoE expert linears: {len(experts)}, calibration tokens routed to each: min {toks[0]}, "
              f"median {toks[len(toks) // 2]}, max {toks[-1]}")
    if report["size_before_bytes"] is not None:
        print(f"  weights on disk: {_mb(report['size_before_bytes'])} -> {_mb(report['size_after_bytes'])}")
