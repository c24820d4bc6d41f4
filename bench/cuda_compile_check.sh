#!/usr/bin/env bash
# Compile-check every CUDA source in csrc/ with the machine's nvcc (no GPU needed):
#   nvcc -arch=sm_80|sm_90 -Xptxas -v -c csrc/<file>.cu -o /tmp/...
# The .cu files include no torch headers, so nothing but the CUDA toolkit is required.
# nvcc is $NVCC, else the one on PATH, else /usr/local/cuda/bin/nvcc, else the newest
# /usr/local/cuda-*/bin/nvcc. Exits non-zero when nvcc is missing, any file fails, or any kernel spills.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
    nvcc="$(command -v nvcc || true)"
fi
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$nvcc" ]]; then
    nvcc="$(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -V | tail -n 1 || true)"
fi
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
    echo "cuda_compile_check: no nvcc found (set NVCC=/path/to/nvcc)" >&2
    exit 2
fi

# Targets: $CUDA_ARCH (one, e.g. sm_90) or sm_80 and sm_90. `-Xptxas -v` reports every kernel's
# registers and spills; any spill store/load fails the check (a spilling optimizer kernel would
# go through local memory on every element).
archs="${CUDA_ARCH:-sm_80 sm_90}"
out="$(mktemp -d /tmp/qlora_fast_cuda_check.XXXXXX)"
trap 'rm -rf "$out"' EXIT
echo "cuda_compile_check: $("$nvcc" --version | tail -n 1) archs: $archs"
status=0
shopt -s nullglob
files=(csrc/*.cu)
if [[ ${#files[@]} -eq 0 ]]; then
    echo "cuda_compile_check: no .cu files in csrc/" >&2
    exit 1
fi
for arch in $archs; do
    for cu in "${files[@]}"; do
        obj="$out/$(basename "$cu" .cu).$arch.o"
        log="$out/$(basename "$cu" .cu).$arch.log"
        if ! "$nvcc" -std=c++17 -arch="$arch" -O3 -fmad=false -Xcompiler -Wall -Xptxas -v -Icsrc -c "$cu" -o "$obj" >"$log" 2>&1; then
            cat "$log" >&2
            echo "FAILED  $cu ($arch)" >&2
            status=1
            continue
        fi
        # ptxas prints "Compiling entry function 'NAME' for 'sm_XX'" then "N bytes spill stores, M bytes spill loads".
        spills="$(awk '/Compiling entry function/ {fn=$7} /spill stores/ && ($5 != 0 || $9 != 0) {print fn": "$0}' "$log")"
        regs="$(grep -c 'registers' "$log" || true)"
        if [[ -n "$spills" ]]; then
            echo "$spills" >&2
            echo "SPILLS  $cu ($arch)" >&2
            status=1
        else
            echo "ok      $cu ($arch, $regs kernels, no spills)"
        fi
    done
done
exit $status
