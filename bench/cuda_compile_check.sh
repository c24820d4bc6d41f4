#!/usr/bin/env bash
# Compile-check every CUDA source in csrc/ with the machine's nvcc (no GPU needed):
#   nvcc -arch=sm_90 -c csrc/<file>.cu -o /tmp/...
# The .cu files include no torch headers, so nothing but the CUDA toolkit is required.
# nvcc is $NVCC, else the one on PATH, else /usr/local/cuda/bin/nvcc, else the newest
# /usr/local/cuda-*/bin/nvcc. Exits non-zero when nvcc is missing or any file fails.
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

arch="${CUDA_ARCH:-sm_90}"
out="$(mktemp -d /tmp/qlora_fast_cuda_check.XXXXXX)"
trap 'rm -rf "$out"' EXIT
echo "cuda_compile_check: $("$nvcc" --version | tail -n 1) -arch=$arch"
status=0
shopt -s nullglob
files=(csrc/*.cu)
if [[ ${#files[@]} -eq 0 ]]; then
    echo "cuda_compile_check: no .cu files in csrc/" >&2
    exit 1
fi
for cu in "${files[@]}"; do
    obj="$out/$(basename "$cu" .cu).o"
    if "$nvcc" -std=c++17 -arch="$arch" -O3 -Xcompiler -Wall -Icsrc -c "$cu" -o "$obj"; then
        echo "ok      $cu"
    else
        echo "FAILED  $cu" >&2
        status=1
    fi
done
exit $status
