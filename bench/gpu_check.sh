#!/usr/bin/env bash
# One GPU session: install the peers, build the extension, run the GPU tests and the benchmarks.
# Run from the repo root on the device machine, with gpu_wheels/ carried (copy of
# ../shared/wheels/gpu). Logs land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site gpu_wheels/*.whl \
    > "$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 || echo "extension build failed: see install.log"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Compiled Triton (not the interpreter): the kernel tests again, on the GPU, plus the gpu-marked ones.
TRITON_INTERPRET=0 QLORA_FAST_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -x -m "gpu" tests \
    > "$OUT/pytest_gpu.log" 2>&1; echo "gpu tests rc=$?" | tee -a "$OUT/pytest_gpu.log"
TRITON_INTERPRET=0 timeout 240 python3 bench/gpu.py --out "$OUT/bench_gpu.log" > /dev/null 2>&1
echo "bench rc=$?"; tail -n 80 "$OUT/bench_gpu.log"
