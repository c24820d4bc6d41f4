"""4-bit matmul forward vs bf16 and bitsandbytes, `run(bench)` for bench/gpu.py.

UNVERIFIED on a GPU: written without one; only the CPU rehearsal (`--tiny`) has run.

A Llama-3-8B MLP weight (14336x4096, NF4, double-quantized, bf16 activations) at M = 1, 16,
32..128 (step 16) and 4096 rows: torch bf16 `F.linear` on the dense weight, bitsandbytes'
`matmul_4bit`, and qlora_fast's `matmul_4bit` (its automatic choice) plus both explicit paths
(fused decode, dequantize + cuBLAS), so the fused/dequant threshold (`SKINNY_MAX_M` in
kernels/nf4_matmul.py) can be set by measurement: the run prints the largest M where the fused
path still wins. Each of our times is also given against the copy-bandwidth floor of the same run
(the bytes of the 4-bit weight and the activations over the measured copy bandwidth; the floor
that decides at small M). Weights and inputs rotate beyond L2 (a 4-bit 14336x4096 weight fits in it).
Checks: every path's output against dequantize + torch.matmul in float32 (relative error), and
bitsandbytes' against ours.
"""
import torch
import torch.nn.functional as F

DTYPE = torch.bfloat16
REL = 1e-2  # bf16 output of a K=4096 product: relative error well under this


def run(bench):
    import qlora_fast.kernels.nf4_matmul as knf4
    from qlora_fast.functional import dequantize_4bit, matmul_4bit, quantize_4bit

    torch.manual_seed(0)
    out_f, in_f = bench.size(gpu=(14336, 4096), tiny=(45, 192))
    rows = bench.size(gpu=[1, 16, 32, 48, 64, 80, 96, 112, 128, 4096], tiny=[1, 16, 33])
    dense = (torch.randn(out_f, in_f, device=bench.device) * 0.02).to(DTYPE)

    def quantized():
        packed, state = quantize_4bit(dense, 64, "nf4", True)
        raw = knf4.Weight4bit(packed, state.absmax, state.code, tuple(state.shape), state.blocksize,
                              state.nested_absmax, state.nested_code, state.offset, state.nested_blocksize)
        return packed, state, raw

    weights = bench.rotated(quantized, out_f * in_f // 2)
    dense_sets = bench.rotated(lambda: dense.clone(), 2 * out_f * in_f)
    packed, state, _ = weights[0]
    w32 = dequantize_4bit(packed, state, torch.float32)
    bnb_weights = None
    with bench.guard("bitsandbytes quantize"):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF

        bnb_weights = [bnbF.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
                       for _ in range(len(weights))]

    copy_gbps = bench.copy_gbps()
    fused_wins = []
    for m in rows:
        # the floor: the 4-bit weight (+ 1-byte absmax per 64) and the bf16 activations read, the output written once
        floor_ms = (out_f * in_f // 2 + out_f * in_f // 64 + 2 * m * (in_f + out_f)) / copy_gbps / 1e6
        case = f"matmul {out_f}x{in_f} nf4+DQ M={m}"
        with bench.guard(case):
            x = torch.randn(m, in_f, device=bench.device, dtype=DTYPE)
            want = x.float() @ w32.t()
            paths = {
                "qlora_fast": (lambda x, p, s, raw: matmul_4bit(x, p, s), weights),
                "qlora_fast fused": (lambda x, p, s, raw: knf4.nf4_matmul(x, *raw, method="fused"), weights),
                "qlora_fast dequant+cuBLAS": (lambda x, p, s, raw: knf4.nf4_matmul(x, *raw, method="dequant"), weights),
            }
            times = {}
            with bench.guard(f"{case} torch bf16"):
                ms, host = bench.time(lambda x, w: F.linear(x, w), [(x, w) for w in dense_sets])
                times["torch bf16"] = ms
                bench.record(case, "torch bf16 F.linear", ms=ms, host_us=host)
            if bnb_weights is not None:
                with bench.guard(f"{case} bitsandbytes"):
                    sets = [(x, p, s) for p, s in bnb_weights]
                    ms, host = bench.time(lambda x, p, s: bnb.matmul_4bit(x, p.t(), s), sets)
                    times["bitsandbytes"] = ms
                    bench.record(case, "bitsandbytes matmul_4bit", ms=ms, host_us=host)
                    bench.close(bnb.matmul_4bit(x, sets[0][1].t(), sets[0][2]), want, REL, f"{case} bitsandbytes")
            for name, (fn, ws) in paths.items():
                with bench.guard(f"{case} {name}"):
                    sets = [(x, *w) for w in ws]
                    ms, host = bench.time(fn, sets)
                    times[name] = ms
                    vs = {
                        f"speedup_vs_{k.replace(' ', '_')}": v / ms
                        for k, v in times.items()
                        if not k.startswith("qlora")
                    }
                    bench.record(case, name, ms=ms, host_us=host, x_copy_floor=ms / floor_ms, **vs)
                    bench.close(fn(*sets[0]), want, REL, f"{case} {name}")
            if "qlora_fast fused" in times and "qlora_fast dequant+cuBLAS" in times:
                if times["qlora_fast fused"] < times["qlora_fast dequant+cuBLAS"]:
                    fused_wins.append(m)
    bench.log(f"  fused path faster at M = {fused_wins}; SKINNY_MAX_M is {knf4.SKINNY_MAX_M} "
              f"(set it to the largest M of the leading run of wins)")
    bench.record("fused/dequant threshold", "qlora_fast", fused_faster_at=fused_wins, skinny_max_m=knf4.SKINNY_MAX_M)
