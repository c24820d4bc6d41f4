"""LoRA / QLoRA layer speed on the CPU: qlora_fast against a PEFT-style layer in one run.

On the CPU qlora_fast runs its PyTorch reference path (the Triton kernels need a GPU), so this
measures the op structure (one custom op for base + adapter, nothing saved but the adapter's
input and x A^T, the 4-bit weight decoded again in backward) against PEFT's: an `nn.Linear` (or
bitsandbytes' CPU `Linear4bit`) base plus `lora_A` / `lora_B` `nn.Linear` modules and dropout.

Cases (fp32 activations, r = 16, dropout 0.05, fwd + bwd, 512 tokens):
  LoRA  1024x1024 base: qlora_fast LoRALinear      vs PEFT-style on nn.Linear
  QLoRA 1024x1024 NF4 : qlora_fast QLoRALinear     vs PEFT-style on bitsandbytes Linear4bit (CPU)
  decode M=1, 2048x2048 NF4 forward: qlora_fast matmul_4bit vs bitsandbytes matmul_4bit (CPU)
Run `pytest bench/bench_lora.py --benchmark-only` for pytest-benchmark tables, or
`python bench/bench_lora.py` for a short summary with the ratios.
"""

import pytest
import torch
from timing import run_times
from torch import nn

from qlora_fast.functional import matmul_4bit
from qlora_fast.nn import LoRALinear, QLoRALinear

TOKENS, IN, OUT, RANK, DROPOUT = 512, 1024, 1024, 16, 0.05


class PeftStyleLoRA(nn.Module):
    """What PEFT's lora.Linear computes: base(x) + B(A(dropout(x))) * scaling, as separate modules."""

    def __init__(self, base, r=RANK, alpha=2 * RANK, dropout=DROPOUT):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(IN, r, bias=False)
        self.lora_B = nn.Linear(r, OUT, bias=False)
        nn.init.normal_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def _bnb_linear4bit(linear):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else layer.weight
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def _ours(quantized):
    linear = nn.Linear(IN, OUT)
    cls = QLoRALinear if quantized else LoRALinear
    module = cls.from_linear(linear, r=RANK, lora_alpha=2 * RANK, lora_dropout=DROPOUT)
    nn.init.normal_(module.lora_B)
    return module.train()


def _peft(quantized):
    linear = nn.Linear(IN, OUT)
    return PeftStyleLoRA(_bnb_linear4bit(linear) if quantized else linear).train()


def make_providers():
    providers = {
        "lora qlora_fast": lambda: _ours(False),
        "lora peft-style": lambda: _peft(False),
        "qlora qlora_fast": lambda: _ours(True),
    }
    try:
        import bitsandbytes  # noqa: F401

        providers["qlora peft-style+bnb"] = lambda: _peft(True)
    except ImportError:
        pass
    return providers


def fwd_bwd(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    return step


def make_step(name):
    module = make_providers()[name]()
    x = torch.randn(TOKENS, IN, requires_grad=True)
    step = fwd_bwd(module, x)
    step()  # warm-up (and make sure it runs)
    return step


def make_decode(provider):
    w = torch.randn(2 * OUT, 2 * IN)
    x = torch.randn(1, 2 * IN)
    if provider == "qlora_fast":
        from qlora_fast.functional import quantize_4bit

        packed, state = quantize_4bit(w, 64, "nf4", True)
        return lambda: matmul_4bit(x, packed, state)
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return lambda: bnb.matmul_4bit(x, packed.t(), state)


@pytest.mark.parametrize("name", list(make_providers()))
def test_lora_fwd_bwd(benchmark, name):
    benchmark.group = "lora fwd+bwd " + name.split()[0]
    benchmark(make_step(name))


@pytest.mark.parametrize("provider", ["qlora_fast", "bitsandbytes"])
def test_decode_matmul_4bit(benchmark, provider):
    if provider == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    benchmark.group = "nf4 decode M=1"
    benchmark(make_decode(provider))


def _time(fn, repeat=10):
    return min(run_times(fn, repeat)) * 1e3


def main():
    torch.manual_seed(0)
    print(f"# CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; best of 10 (ms)")
    results = {name: _time(make_step(name)) for name in make_providers()}
    for name, ms in results.items():
        print(f"fwd+bwd {name:24s} {ms:8.2f} ms")
    print(f"ratio lora  qlora_fast / peft-style     : {results['lora qlora_fast'] / results['lora peft-style']:.2f}")
    if "qlora peft-style+bnb" in results:
        print(f"ratio qlora qlora_fast / peft-style+bnb : "
              f"{results['qlora qlora_fast'] / results['qlora peft-style+bnb']:.2f}")
    ours, theirs = _time(make_decode("qlora_fast"), 20), _time(make_decode("bitsandbytes"), 20)
    print(
        f"decode M=1 2048x2048 NF4: qlora_fast {ours:.3f} ms, bitsandbytes {theirs:.3f} ms, ratio {ours / theirs:.2f}"
    )


if __name__ == "__main__":
    main()
