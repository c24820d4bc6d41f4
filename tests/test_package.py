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
