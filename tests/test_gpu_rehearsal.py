"""The GPU check rehearsed on the CPU (issue 12): `bench/gpu_check.sh --rehearse` runs every stage the
GPU window runs (preflight, carried wheels when present, the gpu-marked tests with the device switched
to the CPU, every bench/gpu_<area>.py at tiny size under the Triton interpreter), so an import path, a
missing fixture or a typo fails here instead of in a 15-minute GPU window."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py: the area list the check runs)


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_FAST_", "TRITON_", "GPU_CHECK_"))}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, **extra)
    return env


def test_rehearsal_runs_every_stage_and_area(tmp_path):
    # the carried wheels (bitsandbytes 0.50.2, torchao 0.18.0) are installed and imported when a
    # checkout has them in .gpu-wheels/ (as the GPU run needs); without them the installed peers are used
    areas = gpu.AREAS + gpu.EXTRA_AREAS  # the GPU run does the extra ones on request: rehearse them all
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--rehearse"], cwd=ROOT,
                          env=_env(tmp_path, GPU_CHECK_AREAS=" ".join(areas)), capture_output=True, text=True,
                          timeout=1800)
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").exists() else ""
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0 and "RESULT: PASS" in summary, f"{summary}\n{proc.stdout[-3000:]}\n{log[-6000:]}"
    stages = ["kernel tests", "extension build", "extension check", "gpu-marked tests", "bench " + " ".join(areas),
              "FSDP2 one-device training + DCP resume"]
    for stage in stages:
        assert f"PASS {stage}" in summary, f"stage {stage!r} did not pass:\n{summary}"
    assert "passed" in log and " failed" not in log
    kernel_stage = log.split("===== kernel tests")[1].split("===== PASS kernel tests")[0]
    assert " passed" in kernel_stage and "skipped" not in kernel_stage, kernel_stage  # every one rehearsed
    bench_log = (tmp_path / "bench.log").read_text()
    for area in areas:
        assert f"## {area}: PASS" in bench_log, bench_log[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["area"] for r in rows} == set(areas)
    assert all(r["tiny"] for r in rows)
    checks = [r for r in rows if "check" in r]
    assert checks and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    assert not [r for r in rows if "error" in r]
    # every area put a figure beside a peer's: more than one provider per area (copy floor aside)
    for area in ("quant", "matmul", "lora", "optim", "train"):
        providers = {r["provider"] for r in rows if r["area"] == area and "provider" in r}
        assert any(p.startswith("qlora_fast") for p in providers) and len(providers) >= 2, (area, providers)


def test_gpu_run_on_a_cpu_machine_aborts_in_preflight(tmp_path):
    if subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0:
        pytest.skip("this machine has nvidia-smi")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PREFLIGHT FAILED: no nvidia-smi" in proc.stdout
    assert (tmp_path / "summary.txt").read_text().startswith("FAIL preflight")


def _fake_tools(tmp_path, names):
    """A PATH where `names` exist as no-op programs (standing in for a GPU machine's tools)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize("wheels,message", [
    (None, "carried wheels missing: {}/"),
    (["bitsandbytes-0.50.2-py3-none-any.whl", "torchao-0.18.0-cp310-abi3-any.whl"], "torch cannot use the device"),
])
def test_gpu_preflight_names_what_is_missing(tmp_path, wheels, message):
    # the GPU branch of the preflight past the tool checks (stand-ins for them): immediate, named aborts
    folder = tmp_path / "wheels"
    if wheels is not None:
        folder.mkdir()
        for name in wheels:
            (folder / name).write_bytes(b"")  # only their names are looked at before torch is asked
    path = _fake_tools(tmp_path, ["nvidia-smi", "nvcc", "ninja"])
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, timeout=120, capture_output=True,
                          text=True, env=_env(tmp_path / "out", PATH=path, GPU_WHEELS=str(folder)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PREFLIGHT FAILED: " + message.format(folder) in proc.stdout, proc.stdout


def test_bench_driver_rejects_unknown_area_and_missing_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--areas", "nope"])
    assert exc.value.code == 2 and "unknown areas" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert gpu.main(["--areas", "quant"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_smoke_launches_a_trivial_kernel_under_the_interpreter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env=_env(tmp_path, TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and "triton smoke ok" in proc.stdout, proc.stdout + proc.stderr


def test_smoke_names_the_failure(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env=_env(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "triton smoke FAILED" in proc.stdout and "C compiler" in proc.stdout and "libcuda" in proc.stdout


def test_records_reach_results_jsonl_as_they_are_made(tmp_path, monkeypatch):
    # a stage killed by its timeout keeps what it had measured: each record is on disk (flushed)
    # before the area ends, in the format the end of the run used to write
    import types

    import torch

    seen = []

    def run(bench):
        bench.record("probe case", "probe", ms=1.5)
        bench.check("probe check", True)
        seen.extend(json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())

    monkeypatch.setitem(sys.modules, "gpu_probe", types.SimpleNamespace(run=run))
    monkeypatch.setattr(gpu, "EXTRA_AREAS", [*gpu.EXTRA_AREAS, "probe"])
    for name in ("TRITON_INTERPRET", "QLORA_FAST_BACKEND"):  # main(--tiny) sets them: restored after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(torch._dynamo.config, "disable", torch._dynamo.config.disable)
    assert gpu.main(["--areas", "probe", "--tiny", "--out-dir", str(tmp_path)]) == 0
    assert [(r.get("case"), r.get("check")) for r in seen] == [("probe case", None), (None, "probe check")]
    assert seen[0]["timer"] == "wall clock (CPU rehearsal)" and seen[0]["tiny"] is True
    assert {"date", "device", "torch", "tiny", "area"} <= set(seen[1])
    final = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert final == seen
