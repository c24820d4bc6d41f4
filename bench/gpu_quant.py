"""NF4/FP4 quantize and dequantize (with and without double quantization) vs bitsandbytes,
torchao's NF4 tensor and the copy-bandwidth floor, `run(bench)` for bench/gpu.py.

UNVERIFIED on a GPU: written without one; only the CPU rehearsal (`--tiny`) has run.

Per shape (bf16 4096x4096 and 14336x4096, blocksize 64): each provider's median time, its GB/s
over the bytes the operation must move (bf16 values + packed codes + statistics) and that as a
fraction of the device-to-device copy bandwidth of the same run (the floor). Quantize is timed by
CUDA events around each call for every provider (ours syncs once per call for its value checks,
so it cannot be graph-captured); dequantize from a CUDA graph where it captures; each row names
both timers (quant_timer, dequant_timer). Each provider is timed on its own, peers first, and
the checks come after every timing, so one provider's failure keeps the others' figures. Checks in the same
run: our packed codes and statistics equal the PyTorch reference's bit for bit, our decode equals
the reference decode, bitsandbytes' packed codes equal ours, and torchao's NF4 round trip has
the reconstruction error ours has (it quantizes its scalers differently, so it is not bit-equal).
"""
import torch

from qlora_fast.reference.blockwise import BLOCKSIZE_8BIT

BLOCKSIZE = 64


def _moved_bytes(n, nested):
    """Bytes a quantize or dequantize must move at least: bf16 values + packed codes + statistics."""
    blocks = -(-n // BLOCKSIZE)
    stats = blocks * (1 if nested else 4) + (4 * -(-blocks // BLOCKSIZE_8BIT) if nested else 0)
    return 2 * n + n // 2 + stats


def _peers(bench):
    """{name: (quantize(x, quant_type, nested) or None when unsupported, dequantize(q))}."""
    peers = {}
    with bench.guard("import bitsandbytes"):
        import bitsandbytes.functional as bnbF

        peers["bitsandbytes"] = (
            lambda x, qt, nested: bnbF.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type=qt, compress_statistics=nested),
            lambda q: bnbF.dequantize_4bit(*q),
        )
    with bench.guard("import torchao"):
        # the path that exists in torchao 0.18 (the carried wheel); torchao.dtypes.nf4tensor is gone
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        def torchao_quantize(x, qt, nested):
            if qt != "nf4" or not nested:
                return None  # NF4Tensor is NF4 only and always quantizes its scalers
            return to_nf4(x, block_size=BLOCKSIZE, scaler_block_size=BLOCKSIZE_8BIT)

        peers["torchao"] = (torchao_quantize, lambda q: q.get_original_weight())
    return peers


def run(bench):
    from qlora_fast.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    copy_gbps = bench.copy_gbps()
    bench.log(f"  copy bandwidth floor: {copy_gbps:.0f} GB/s")
    peers = _peers(bench)
    # torchao needs whole scaler blocks: numel a multiple of 64 * 256
    shapes = bench.size(gpu=[(4096, 4096), (14336, 4096)], tiny=[(64, 256)])
    for shape in shapes:
        for quant_type in ("nf4", "fp4"):
            for nested in (False, True):
                case = f"{quant_type} {'x'.join(map(str, shape))} bf16 bs{BLOCKSIZE}{' +DQ' if nested else ''}"
                with bench.guard(case):
                    _case(bench, case, shape, quant_type, nested, peers, quantize_4bit, dequantize_4bit, copy_gbps)


def _case(bench, case, shape, quant_type, nested, peers, quantize_4bit, dequantize_4bit, copy_gbps):
    """Each provider timed in its own guard, the peers first (a fault of ours cannot take their
    figures with it), then every check. Quantize is timed with events around each call for every
    provider (ours syncs once per call for its value checks, so it cannot be captured in a CUDA
    graph: timing the peers from a graph would not be the same measurement); dequantize from a
    CUDA graph where it captures. Each row names both timers (quant_timer, dequant_timer)."""
    n = shape[0] * shape[1]
    moved = _moved_bytes(n, nested)
    xs = bench.rotated(lambda: torch.randn(shape, device=bench.device, dtype=torch.bfloat16), 2 * n)
    x = xs[0]

    def timed(quantize, dequantize):
        """The figures of one provider: quantize by per-call events, dequantize by graph (else events)."""
        q_ms, q_host = bench.time(quantize, [(t,) for t in xs], graph=False)
        q_timer = bench.timer
        qs = [quantize(t) for t in xs]
        d_ms, d_host = bench.time(dequantize, [(q,) for q in qs])
        return dict(quant_ms=q_ms, quant_gbps=moved / q_ms / 1e6, quant_x_floor=q_ms / (moved / copy_gbps / 1e6),
                    quant_host_us=q_host, quant_timer=q_timer, dequant_ms=d_ms, dequant_gbps=moved / d_ms / 1e6,
                    dequant_pct_copy=100 * moved / d_ms / 1e6 / copy_gbps, dequant_host_us=d_host,
                    dequant_timer=bench.timer)

    rows, peer_q = {}, {}
    for name, (peer_quantize, peer_dequantize) in peers.items():
        with bench.guard(f"{case} {name}"):
            q = peer_quantize(x, quant_type, nested)
            if q is None:
                continue
            peer_q[name] = q
            rows[name] = bench.record(case, name, **timed(lambda t: peer_quantize(t, quant_type, nested),
                                                          peer_dequantize))

    quantize = lambda x: quantize_4bit(x, BLOCKSIZE, quant_type, nested)  # noqa: E731
    dequantize = lambda q: dequantize_4bit(q[0], q[1], torch.bfloat16)  # noqa: E731
    with bench.guard(f"{case} qlora_fast"):
        rows["qlora_fast"] = bench.record(case, "qlora_fast", **timed(quantize, dequantize))

    with bench.guard(f"{case} checks"):
        packed, state = quantize(x)
        out = dequantize((packed, state))
        with bench.backend("reference"):
            ref_packed, ref_state = quantize(x)
            ref_out = dequantize((ref_packed, ref_state))
        bench.check(f"{case}: packed and absmax == reference", torch.equal(packed, ref_packed)
                    and torch.equal(state.absmax, ref_state.absmax))
        bench.check(f"{case}: dequantize == reference", torch.equal(out, ref_out))
        ours_err = ((out.float() - x.float()).norm() / x.float().norm()).item()
        for name, q in peer_q.items():
            with bench.guard(f"{case} {name} check"):
                if name == "bitsandbytes":
                    diff = int((q[0].reshape(-1) != packed.reshape(-1)).sum())
                    bench.check(
                        f"{case}: bitsandbytes packed == ours", diff == 0, f"{diff} of {packed.numel()} bytes differ"
                    )
                else:
                    theirs = peers[name][1](q).float()
                    err = ((theirs - x.float()).norm() / x.float().norm()).item()
                    bench.check(f"{case}: {name} round-trip error ~ ours", err <= 1.05 * ours_err + 1e-3,
                                f"{name} {err:.4f}, ours {ours_err:.4f}")

    ours = rows.get("qlora_fast")
    for name, row in rows.items():
        if ours is None or name == "qlora_fast":
            continue
        same = row["dequant_timer"] == ours["dequant_timer"]
        bench.log(f"    qlora_fast speed-up over {name}: quantize {row['quant_ms'] / ours['quant_ms']:.2f}x, "
                  f"dequantize {row['dequant_ms'] / ours['dequant_ms']:.2f}x"
                  + ("" if same else f" (dequantize timed differently: {name} by {row['dequant_timer']}, "
                                     f"qlora_fast by {ours['dequant_timer']})"))
