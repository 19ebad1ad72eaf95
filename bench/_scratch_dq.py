import math, sys, torch, triton
from bench.common import Interleaved, copies_for
from bench.kernels.w4a16 import weight_sets, budget_rounds
from lowbit.kernels.w4a16_dequant import w4a16_dequant_kernel, dequant_matmul
from lowbit.kernels.w4a16 import w4a16_gemm

def dq(w, out, block_n, warps, stages=None):
    grid = (triton.cdiv(w.n, block_n), w.k_pad // w.block_k)
    kw = {} if stages is None else {"num_stages": stages}
    w4a16_dequant_kernel[grid](w.qweight, w.scales, w.scales, out, w.n, w.n, w.k, out.stride(0), BITS=4, W=w.words,
        GS=w.gk, HAS_ZEROS=False, USE_ASM=True, BLOCK_N=block_n, num_warps=warps, **kw)

dt = torch.bfloat16
for n, k in [(10240, 5120), (5120, 8192), (6144, 4096), (4096, 14336)]:
    ws = weight_sets(n, k, copies_for(n * k // 2), dt)
    out = torch.empty(n, k, device="cuda", dtype=dt)
    dense = [torch.randn(n, k, device="cuda", dtype=dt) for _ in range(3)]
    src = torch.empty(n * k * 5 // 2 // 4, device="cuda", dtype=torch.int32)
    cp = torch.empty_like(src)
    t = Interleaved(budget_rounds)
    t.add("copy_same_bytes", [lambda: cp.copy_(src)])
    for bn in (32, 64, 128):
        for wp in (4, 8):
            t.add(f"dq{bn}w{wp}", [lambda w=w, bn=bn, wp=wp: dq(w, out, bn, wp) for w in ws])
    r = t.run()
    gb = n * k * 2.5 / 1e3
    print(n, k, {a: (round(b, 1), round(gb / b)) for a, b in r.items() if b})
    for m in (1024, 4096):
        x = torch.randn(m, k, device="cuda", dtype=dt)
        t = Interleaved(budget_rounds)
        t.add("bf16", [lambda d=d: torch.matmul(x, d.t()) for d in dense])
        t.add("mm_scratch", [lambda: torch.matmul(x, out.t())])
        t.add("dqmm1", [lambda w=w: dequant_matmul(x, w, None) for w in ws])
        t.add("dqmm4ov", [lambda w=w: dequant_matmul(x, w, None, 4, True) for w in ws])
        t.add("dqmm2ov", [lambda w=w: dequant_matmul(x, w, None, 2, True) for w in ws])
        t.add("dqmm4", [lambda w=w: dequant_matmul(x, w, None, 4, False) for w in ws])
        t.add("lowbit", [lambda w=w: w4a16_gemm(x, w) for w in ws])
        r = t.run()
        print("  M", m, {a: round(b, 1) for a, b in r.items() if b}, "ratio", round(r["bf16"] / r["lowbit"], 3), flush=True)
    del ws, dense, out
    torch.cuda.empty_cache()
