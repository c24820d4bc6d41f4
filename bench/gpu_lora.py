"""GPU benchmark for the fused NF4 matmul and LoRA/QLoRA layers (issue 3), `run(log)` for bench/gpu.py.

UNVERIFIED: written on a machine without a GPU; no figure from it has been measured yet, and
the fused-vs-dequant threshold in kernels/nf4_matmul.py (SKINNY_MAX_M) awaits these numbers.

Cases (the issue's table; layer out x in, bf16 activations, NF4 with double quantization),
each timed with `triton.testing.do_bench` (median ms) for every provider in the same run:
  forward M=1, 16, 4096 on 14336x4096: torch bf16 F.linear, bitsandbytes matmul_4bit, and
      qlora_fast matmul_4bit (auto path) plus both explicit paths (fused decode, dequant+cuBLAS);
  LoRA r=16 fwd+bwd, 4096 tokens, on 4096x4096 and 14336x4096: PEFT (or a PEFT-style layer when
      peft is absent) on a bf16 base and on bitsandbytes' Linear4bit, qlora_fast LoRALinear (bf16
      base) and QLoRALinear (NF4 base), with each one's peak memory over fwd+bwd.
It prints ratios against the issue's targets (M=1 <= 0.015 ms, M=16 <= 0.020 ms, M=4096 <= 1.05x
bf16, QLoRA fwd+bwd <= 1.10x the bf16 LoRA of the same run, peak memory <= PEFT + bitsandbytes)
and the max error of qlora_fast's outputs against a float32 reference on the same weight.
"""
import torch
from torch import nn

DTYPE = torch.bfloat16


def _bench(fn, rep_ms=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=rep_ms)


def _peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _forward_cases(log):
    from qlora_fast.functional import matmul_4bit, quantize_4bit
    from qlora_fast.kernels.nf4_matmul import nf4_matmul

    out_f, in_f = 14336, 4096
    w = torch.randn(out_f, in_f, device="cuda", dtype=DTYPE) * 0.02
    packed, state = quantize_4bit(w, 64, "nf4", True)
    w_deq = None
    try:
        import bitsandbytes.functional as bnbF
        import bitsandbytes as bnb

        bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        w_deq = bnbF.dequantize_4bit(bnb_packed, bnb_state).float()
    except Exception as exc:  # a missing or broken peer is reported, not fatal
        bnb = None
        log(f"bitsandbytes unavailable: {exc!r}")
    from qlora_fast.functional import dequantize_4bit

    ours_deq = dequantize_4bit(packed, state, torch.float32)
    raw = (packed, state.absmax, state.code, tuple(state.shape), state.blocksize, state.nested_absmax,
           state.nested_code, state.offset, state.nested_blocksize)
    targets = {1: "<= 0.015 ms", 16: "<= 0.020 ms", 4096: "<= 1.05 x bf16"}
    for m in (1, 16, 4096):
        x = torch.randn(m, in_f, device="cuda", dtype=DTYPE)
        times = {"torch bf16": _bench(lambda: torch.nn.functional.linear(x, w))}
        if bnb is not None:
            times["bitsandbytes"] = _bench(lambda: bnb.matmul_4bit(x, bnb_packed.t(), bnb_state))
        times["qlora_fast"] = _bench(lambda: matmul_4bit(x, packed, state))
        times["qlora_fast fused"] = _bench(lambda: nf4_matmul(x, *raw, method="fused"))
        times["qlora_fast dequant+cuBLAS"] = _bench(lambda: nf4_matmul(x, *raw, method="dequant"))
        err = (matmul_4bit(x, packed, state).float() - x.float() @ ours_deq.t()).abs().max().item()
        line = ", ".join(f"{k} {v:.4f} ms" for k, v in times.items())
        log(f"forward M={m} {out_f}x{in_f}: {line}")
        log(f"  qlora_fast / bf16 = {times['qlora_fast'] / times['torch bf16']:.2f}"
            + (f", / bitsandbytes = {times['qlora_fast'] / times['bitsandbytes']:.2f}" if "bitsandbytes" in times else "")
            + f"; target {targets[m]}; max |err| vs fp32 on the same weight {err:.3e}")
    if w_deq is not None:
        log(f"  dequantized weights qlora_fast vs bitsandbytes max diff: {(ours_deq - w_deq).abs().max().item():.3e}")


class _PeftStyle(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device="cuda", dtype=DTYPE)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device="cuda", dtype=DTYPE)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _peft_wrap(base, r, alpha, log_once):
    try:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(nn.Sequential(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"],
                                                               lora_dropout=0.0))
        return model, "peft"
    except Exception as exc:
        log_once(f"peft unavailable ({exc!r}): using a PEFT-style layer")
        return _PeftStyle(base, r, alpha), "peft-style"


def _lora_cases(log):
    from qlora_fast.nn import LoRALinear, QLoRALinear

    said = set()

    def log_once(msg):
        if msg not in said:
            said.add(msg)
            log(msg)

    r, alpha, tokens = 16, 32, 4096
    for out_f, in_f in ((4096, 4096), (14336, 4096)):
        linear = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE)
        x = torch.randn(tokens, in_f, device="cuda", dtype=DTYPE, requires_grad=True)
        grad = torch.randn(tokens, out_f, device="cuda", dtype=DTYPE)
        providers = {}
        # timing only: the bf16 bases are fresh random layers of the same shape
        peft_bf16, kind = _peft_wrap(nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE), r, alpha, log_once)
        providers[f"{kind} bf16"] = peft_bf16
        try:
            import bitsandbytes as bnb

            layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=DTYPE, quant_type="nf4",
                                      compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu().clone(), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)
            providers[f"{kind} + bitsandbytes"] = _peft_wrap(layer.cuda(), r, alpha, log_once)[0]
        except Exception as exc:
            log(f"bitsandbytes Linear4bit unavailable: {exc!r}")
        providers["qlora_fast LoRALinear (bf16 base)"] = LoRALinear.from_linear(
            nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE), r=r, alpha=alpha)
        providers["qlora_fast QLoRALinear (NF4)"] = QLoRALinear.from_linear(linear, r=r, alpha=alpha)
        times, peaks = {}, {}
        for name, module in providers.items():
            module.train()

            def step(module=module):
                x.grad = None
                for p in module.parameters():
                    p.grad = None
                module(x).backward(grad)

            times[name] = _bench(step)
            peaks[name] = _peak_mb(step)
        log(f"LoRA r={r} fwd+bwd, {tokens} tokens, {out_f}x{in_f}:")
        for name in providers:
            log(f"  {name:40s} {times[name]:.3f} ms  peak {peaks[name]:.0f} MiB")
        bf16_key = f"{kind} bf16"
        ours = "qlora_fast QLoRALinear (NF4)"
        log(f"  QLoRA qlora_fast / bf16 LoRA = {times[ours] / times[bf16_key]:.2f} (target <= 1.10); "
            f"LoRALinear / bf16 LoRA = {times['qlora_fast LoRALinear (bf16 base)'] / times[bf16_key]:.2f}")
        bnb_key = f"{kind} + bitsandbytes"
        if bnb_key in times:
            log(f"  QLoRA qlora_fast / {bnb_key} = {times[ours] / times[bnb_key]:.2f}; peak memory "
                f"{peaks[ours]:.0f} vs {peaks[bnb_key]:.0f} MiB (target: no higher)")
        del providers
        torch.cuda.empty_cache()


def run(log):
    torch.manual_seed(0)
    _forward_cases(log)
    _lora_cases(log)


if __name__ == "__main__":
    run(print)
