"""The package installs as laid out: kernels under qlora_fast.kernels, the CLI has help."""
import subprocess
import sys


def test_kernels_installed_as_subpackage():
    import qlora_fast.kernels

    assert qlora_fast.kernels.__name__ == "qlora_fast.kernels"


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "qlora_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "qlora-fast" in out.stdout


def test_quantize_report_runs(capsys):
    # `make demo`: a random model quantized, per layer and total bits/param, bytes saved, error, times
    from qlora_fast.cli import main

    assert main(["quantize-report", "--model", "stack", "--layers", "1", "--hidden-size", "64",
                 "--intermediate-size", "96", "--dtype", "float32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum(line.startswith("layer0.") for line in lines) == 7
    total = next(line for line in lines if line.startswith("total")).split()
    bits = float(total[2])
    # 64*64 .. 96*64 weights at blocksize 64 with double quantization: 4 + 8/64 + (nested + offset)
    assert 4.125 < bits < 4.2
    assert 0.05 < float(total[5]) < 0.15  # NF4 relative error of Gaussian-like weights is ~0.09


def test_cli_registers_without_torch_and_names_the_trainers_optimizers():
    # `qlora-fast --help` stays fast: registering every command must not import torch.
    code = ("import sys; from qlora_fast.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported at registration'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from qlora_fast.commands import OPTIMIZERS
    from qlora_fast.train.sft import OPTIMIZERS as TRAINER_OPTIMIZERS

    assert OPTIMIZERS == TRAINER_OPTIMIZERS
