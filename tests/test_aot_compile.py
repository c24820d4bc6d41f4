"""The AOT compile gate (bench/aot_compile.py) itself: it finds every kernel family through the
launchers, specializes like the JIT, compiles for a GPU target on the CPU and fails loudly.

Runs the gate in subprocesses: it must see the kernels without TRITON_INTERPRET (GPU launch paths),
while this test process imports them under the interpreter. The full gate runs in CI (`make aot`).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "bench" / "aot_compile.py"


def run_gate(*args, kernels_dir=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(GATE), *args] + (["--kernels-dir", str(kernels_dir)] if kernels_dir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_gate_enumerates_every_kernel_from_the_launchers():
    rc, out = run_gate("--quick", "--list")
    assert rc == 0 and "LAUNCHER-ERROR" not in out, out[-3000:]
    # the gate itself fails on a `*_kernel` no scenario launches (UNCOVERED); the families:
    modules = set(re.findall(r"^(\w+)\.\w+ \[", out, re.M))
    assert {"nf4", "nf4_matmul"} <= modules, modules
    for kernel in ("_quantize_4bit_kernel", "_quantize_absmax_kernel", "_dequantize_4bit_kernel"):
        assert re.search(rf"^nf4\.{kernel} \[", out, re.M), kernel
    n_specs = int(re.search(r"-> (\d+) specializations", out).group(1))
    assert n_specs == len(re.findall(r"^\w+\.\w+ \[", out, re.M)) > 10
    # deduplicated: more launches recorded than specializations kept
    assert int(re.search(r"(\d+) launches recorded", out).group(1)) > n_specs


TOY = """
import sys
sys.path.insert(0, sys.argv[1])
import aot_compile as A
import torch, triton, triton.language as tl

@triton.jit
def toy_kernel(x_ptr, n, m, one, B: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, B), tl.zeros((B,), tl.float16), mask=tl.arange(0, B) < n + m + one)

rec = A.Recorder()
rec.scenario = "toy"
x = torch.empty(64, device="meta", dtype=torch.float16)
with rec.patched():
    toy_kernel[(1,)](x, 32, 33, 1, B=4)
    toy_kernel[(1,)](x[8:], 48, 17, 1, B=4)  # 16 bytes in: the same specialization
    toy_kernel[(1,)](x[1:], 32, 33, 1, B=4)  # 2 bytes in: the pointer loses its alignment
    toy_kernel[(1,)](x, 32, 1, 2, B=4)  # m == 1 becomes a constant
print(rec.launches)
for fn, sig, constexprs, attrs, options in rec.specs.values():
    print(sorted(k[0] for k in constexprs), sorted(k[0] for k, v in attrs.items() if v))
"""


def test_gate_specializes_like_the_jit(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), str(GATE.parent)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == "4"
    # (constexpr argument indices, divisibility-16 argument indices) per deduplicated specialization
    assert lines[1:4] == ["[3, 4] [0, 1]", "[3, 4] [1]", "[2, 4] [0, 1]"], proc.stdout


def test_gate_compiles_for_sm90_and_reports_resources():
    rc, out = run_gate("--quick", "-k", "_quantize_absmax", "--arch", "90", "--jobs", "1", "--limit", "1")
    assert rc == 0, out[-3000:]
    lines = [l for l in out.splitlines() if l.startswith("sm_90 ")]
    assert lines and all(" ok " in l for l in lines), out[-3000:]
    regs = [int(x) for x in re.findall(r"regs=(\d+)", out)]
    assert regs and all(0 < r <= 255 for r in regs)
    assert "aot_compile PASSED" in out


def test_gate_fails_and_names_a_kernel_that_does_not_compile(tmp_path):
    broken = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", broken, ignore=shutil.ignore_patterns("__pycache__"))
    src = (broken / "nf4.py").read_text()
    marker = "    tl.store(nested_ptr + block, nested, mask=block < n_blocks)\n"
    assert src.count(marker) == 1
    (broken / "nf4.py").write_text(src.replace(marker, marker + "    tl.static_assert(NESTED < 0)\n"))
    rc, out = run_gate("--quick", "-k", "_quantize_absmax", "--arch", "90", "--jobs", "1", "--limit", "1",
                       kernels_dir=broken)
    assert rc == 1, out[-3000:]
    assert re.search(r"^sm_90 FAIL-COMPILE nf4\._quantize_absmax_kernel", out, re.M), out[-3000:]
    assert "aot_compile FAILED" in out
    # the summary table names the kernel and counts the failure as a compile error
    assert re.search(r"^\| nf4\._quantize_absmax_kernel \| sm_90 \| 1 \| 0 / 0 / 1 \|", out, re.M), out[-3000:]
