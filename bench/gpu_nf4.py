"""GPU NF4 benchmark (issue 2), called by bench/gpu.py as `run(log)`.

UNVERIFIED: written on a machine without a GPU; no figure from it has been measured yet.

For 4096x4096, 14336x4096 and 8192x8192 bf16 weights (blocksize 64), with and without double
quantization: quantize and dequantize (to bf16) times of qlora_fast's Triton kernels,
bitsandbytes and torchao (`to_nf4`, always double-quantized), timed with
`triton.testing.do_bench` (median). Each time is turned into GB/s from the bytes the operation
must move (bf16 in + packed/statistics out for quantize, the reverse for dequantize) and into
a fraction of the device-to-device copy bandwidth measured in the same run (read + write of a
1 GiB buffer). Issue targets: dequantize >= 90% of the copy bandwidth, quantize within 2x of its
bandwidth floor (bytes / copy bandwidth). Peers are imported inside try/except: a missing one is
reported, not fatal. Packed bytes are also compared with bitsandbytes' (mismatch count printed).
"""
import torch

SHAPES = [(4096, 4096), (14336, 4096), (8192, 8192)]
BLOCKSIZE = 64


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200)


def copy_bandwidth(log, nbytes=1 << 30):
    """Device-to-device copy bandwidth in GB/s, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    bw = 2 * nbytes / ms / 1e6
    log(f"device-to-device copy: {bw:.0f} GB/s ({nbytes >> 20} MiB buffer, read + write)")
    del src, dst
    return bw


def _moved_bytes(n, nested):
    """Bytes a quantize or dequantize must move at least: bf16 values + packed codes + statistics."""
    blocks = -(-n // BLOCKSIZE)
    stats = blocks * (1 if nested else 4) + (4 * -(-blocks // 256) if nested else 0)
    return 2 * n + n // 2 + stats


def _providers(log):
    from qlora_fast.functional import dequantize_4bit, quantize_4bit

    out = {
        "qlora_fast": (
            lambda x, nested: quantize_4bit(x, BLOCKSIZE, "nf4", nested),
            lambda q: dequantize_4bit(*q, out_dtype=torch.bfloat16),
        )
    }
    try:
        import bitsandbytes.functional as bnbF

        out["bitsandbytes"] = (
            lambda x, nested: bnbF.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=nested),
            lambda q: bnbF.dequantize_4bit(*q),
        )
    except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
        log(f"bitsandbytes unavailable: {exc!r}")
    try:
        from torchao.dtypes.nf4tensor import to_nf4

        def torchao_quantize(x, nested):
            if not nested:
                return None  # NF4Tensor always quantizes its scalers
            return to_nf4(x, block_size=BLOCKSIZE, scaler_block_size=256)

        out["torchao"] = (torchao_quantize, lambda q: q.get_original_weight())
    except Exception as exc:  # noqa: BLE001
        log(f"torchao unavailable: {exc!r}")
    return out


def run(log):
    if not torch.cuda.is_available():
        log("gpu_nf4: no CUDA device")
        return
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(log)
    providers = _providers(log)
    log(f"{'shape':>11} {'DQ':>3} {'provider':<13} {'quant ms':>9} {'GB/s':>6} {'x floor':>7} "
        f"{'dequant ms':>10} {'GB/s':>6} {'% copy':>6}")
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        n = x.numel()
        for nested in (True, False):
            moved = _moved_bytes(n, nested)
            floor_ms = moved / copy_bw / 1e6
            reference_packed = None
            for name, (quantize, dequantize) in providers.items():
                try:
                    q = quantize(x, nested)
                    if q is None:
                        log(f"{'x'.join(map(str, shape)):>11} {'on' if nested else 'off':>3} {name:<13} n/a (no option)")
                        continue
                    q_ms = _bench(lambda: quantize(x, nested))
                    d_ms = _bench(lambda: dequantize(q))
                except Exception as exc:  # noqa: BLE001 - one provider failing must not hide the rest
                    log(f"{'x'.join(map(str, shape)):>11} {name}: failed: {exc!r}")
                    continue
                log(f"{'x'.join(map(str, shape)):>11} {'on' if nested else 'off':>3} {name:<13} "
                    f"{q_ms:9.3f} {moved / q_ms / 1e6:6.0f} {q_ms / floor_ms:7.2f} "
                    f"{d_ms:10.3f} {moved / d_ms / 1e6:6.0f} {100 * moved / d_ms / 1e6 / copy_bw:5.0f}%")
                if name in ("qlora_fast", "bitsandbytes"):
                    packed = q[0].reshape(-1)
                    if reference_packed is None:
                        reference_packed = packed
                    else:
                        diff = int((packed != reference_packed).sum())
                        log(f"    packed bytes differing from qlora_fast: {diff} of {packed.numel()}")
        del x
        torch.cuda.empty_cache()
