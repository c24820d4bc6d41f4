"""Fused LoRA and QLoRA forward+backward vs PEFT (+ bitsandbytes) and bf16 LoRA, `run(bench)` for
bench/gpu.py.

UNVERIFIED on a GPU: written without one; only the CPU rehearsal (`--tiny`) has run.

LoRA r=16 (alpha 32), 4096 tokens, bf16 activations, on 4096x4096 and 14336x4096 layers. Each
provider's fwd+bwd median time and peak memory over the step, in the same run:
  PEFT on a bf16 base (bf16 LoRA), PEFT on bitsandbytes' Linear4bit (NF4, double-quantized),
  qlora_fast LoRALinear (bf16 base) and QLoRALinear (NF4 base, double-quantized).
Targets (issue 3): QLoRA fwd+bwd <= 1.10x the bf16 LoRA of the same run, peak memory <= PEFT +
bitsandbytes. Checks: each qlora_fast layer's output and gradients against the same layer run with
the plain-PyTorch reference backend; the PEFT + bitsandbytes output's distance to ours on the same
weight and adapter (bit-compatible quantization) is reported beside.
"""
import copy

import torch
from torch import nn

DTYPE = torch.bfloat16
R, ALPHA = 16, 32
REL = 2e-2  # bf16 products over K = 4096 and 4-bit weights: relative error well under this


def _peft(base):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        nn.Sequential(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], lora_dropout=0.0)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)  # PEFT starts B at zero: the adapter path would compute nothing
    return model


def _bnb_base(linear, device):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=DTYPE,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    return layer.to(device)


def run(bench):
    from qlora_fast.nn import LoRALinear, QLoRALinear

    torch.manual_seed(0)
    tokens = bench.size(gpu=4096, tiny=33)
    shapes = bench.size(gpu=[(4096, 4096), (14336, 4096)], tiny=[(45, 192)])
    for out_f, in_f in shapes:
        case = f"LoRA r={R} fwd+bwd {tokens} tokens {out_f}x{in_f}"
        with bench.guard(case):
            _case(bench, case, tokens, out_f, in_f, LoRALinear, QLoRALinear)


def _case(bench, case, tokens, out_f, in_f, LoRALinear, QLoRALinear):
    dev = bench.device
    linear = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=DTYPE)
    x = torch.randn(tokens, in_f, device=dev, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=dev, dtype=DTYPE)
    providers = {}
    with bench.guard(f"{case} PEFT bf16"):
        providers["PEFT bf16 LoRA"] = _peft(copy.deepcopy(linear))
    with bench.guard(f"{case} PEFT + bitsandbytes"):
        providers["PEFT + bitsandbytes QLoRA"] = _peft(_bnb_base(linear, dev))
    with bench.guard(f"{case} qlora_fast"):
        providers["qlora_fast LoRALinear (bf16)"] = LoRALinear.from_linear(copy.deepcopy(linear), r=R, lora_alpha=ALPHA)
        providers["qlora_fast QLoRALinear (NF4)"] = QLoRALinear.from_linear(
            copy.deepcopy(linear), r=R, lora_alpha=ALPHA
        )
        for name in ("qlora_fast LoRALinear (bf16)", "qlora_fast QLoRALinear (NF4)"):
            nn.init.normal_(providers[name].lora_B, std=0.02)  # B starts at zero, as in PEFT
    times, peaks = {}, {}
    for name, module in providers.items():
        with bench.guard(f"{case} {name}"):
            module.train()

            def step(module=module):
                x.grad = None
                for p in module.parameters():
                    p.grad = None
                module(x).backward(grad)

            ms, host = bench.time(step, graph=False)
            peak = bench.peak_mib(step)
            times[name], peaks[name] = ms, peak
            extra = {}
            if "PEFT bf16 LoRA" in times and name != "PEFT bf16 LoRA":
                extra["x_bf16_lora"] = ms / times["PEFT bf16 LoRA"]
            bench.record(case, name, ms=ms, host_us=host, peak_mib=peak, **extra)
            if name.startswith("qlora_fast"):
                _check_against_reference(bench, f"{case} {name}", module, x, grad)
    ours, peer = "qlora_fast QLoRALinear (NF4)", "PEFT + bitsandbytes QLoRA"
    if ours in times and "PEFT bf16 LoRA" in times:
        bench.log(f"  QLoRA qlora_fast / bf16 LoRA = {times[ours] / times['PEFT bf16 LoRA']:.2f} (target <= 1.10)")
    if ours in times and peer in times:
        bench.log(f"  QLoRA qlora_fast speed-up over {peer}: {times[peer] / times[ours]:.2f}x; peak memory "
                  f"{peaks[ours]} vs {peaks[peer]} MiB (target: no higher)")
        with bench.guard(f"{case} PEFT + bitsandbytes vs ours"):
            # same weight, bit-compatible quantization, same adapter values: same output
            theirs, mine = providers[peer], providers[ours]
            layer = theirs.base_model.model[0]
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(mine.lora_A)
                layer.lora_B["default"].weight.copy_(mine.lora_B)
                got, want = theirs(x).double(), mine(x).double()
            # a figure, not a check: ours is checked against the reference backend above
            bench.record(case, f"{peer} vs ours", output_rel_diff=((got - want).norm() / want.norm()).item())


def _check_against_reference(bench, what, module, x, grad):
    """Output and gradients (x, adapter) of `module` vs the same module on the reference backend."""
    def fwd_bwd():
        xg = x.detach().clone().requires_grad_()
        for p in module.parameters():
            p.grad = None
        y = module(xg)
        y.backward(grad)
        return [y.detach(), xg.grad] + [p.grad.clone() for p in module.parameters() if p.requires_grad]

    got = fwd_bwd()
    with bench.backend("reference"):
        want = fwd_bwd()
    for i, (g, w) in enumerate(zip(got, want)):
        bench.close(g, w, REL, f"{what} {['y', 'dx'][i] if i < 2 else f'dparam{i - 2}'} vs reference backend")
