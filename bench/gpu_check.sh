#!/usr/bin/env bash
# One GPU window: preflight, the kernel tests on CUDA, the extension build, the gpu-marked tests and
# every bench/gpu_<area>.py figure, each stage under its own timeout inside a total budget. No
# stage stops the others; each failure is named; a PASS/FAIL summary comes last and the exit
# status is non-zero on any failure (2: preflight abort, 1: a stage failed).
#
#   bench/gpu_check.sh              on the GPU machine, from the repo root, with .gpu-wheels/ carried
#                                   (a copy of ../shared/wheels/gpu: bitsandbytes 0.50.2, torchao 0.18.0)
#   bench/gpu_check.sh --rehearse   on a CPU: the same stages at tiny size under the Triton interpreter
#                                   (tests/test_gpu_rehearsal.py runs this so a typo cannot cost a window)
#
# Device tool call: ONE run (the machine's start takes minutes of the 15-minute window and it is
# handed back after 30 s idle, so a rerun means a fresh start), after
# `mkdir -p .gpu-wheels && cp ../shared/wheels/gpu/*.whl .gpu-wheels/` (git-excluded; 46 MB):
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
# Everything lands in $OUT (default: a fresh temp dir): gpu_check.log (every stage's stdout and
# stderr), bench.log, results.jsonl (one JSON record per figure or check), summary.txt,
# nvidia-smi.txt. Environment: GPU_CHECK_BUDGET_S (total seconds; 540 on a GPU, 1500 rehearsing,
# where each stage's timeout is 5x its GPU one),
# GPU_WHEELS (wheel folder, default .gpu-wheels), GPU_CHECK_AREAS (bench areas, default the issue's
# five, headline first: train matmul lora quant optim; grpo and reasoning are extra), PYTHON (default
# python3), GPU_CHECK_KEEP_GOING=1 (run the extension's stages even when its build or check failed).
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE=0
case "${1:-}" in
    --rehearse) REHEARSE=1 ;;
    "") ;;
    *) echo "usage: bench/gpu_check.sh [--rehearse]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
WHEELS=${GPU_WHEELS:-.gpu-wheels}
# the headline first: if the budget runs out, the last areas are the ones named "not run"
AREAS=${GPU_CHECK_AREAS:-train matmul lora quant optim}
# the kernel test files: those that take their device from conftest's switch (they run whole on CUDA)
# (not test_optim_gpu.py: it needs the optimizer extension, built meanwhile; it runs with the gpu-marked tests)
KERNEL_TESTS=$(grep -l -e "on_test_device" -e "TEST_DEVICE" tests/test_*.py | grep -v test_optim_gpu.py | tr '\n' ' ')
if (( REHEARSE )); then
    TOTAL=${GPU_CHECK_BUDGET_S:-1500}
    SCALE=5  # stage timeouts: the interpreter on a (possibly shared) CPU
    export TRITON_INTERPRET=1 QLORA_FAST_TEST_DEVICE=cpu QLORA_FAST_BACKEND=triton
    PYTEST_DEVICE_ARGS="--gpu-rehearsal -p no:xdist"
    TINY=--tiny
else
    TOTAL=${GPU_CHECK_BUDGET_S:-540}
    SCALE=1
    export TRITON_INTERPRET=0 QLORA_FAST_TEST_DEVICE=cuda
    PYTEST_DEVICE_ARGS=""
    TINY=""
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
RESULTS=()
FAILED=0

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
abort() {
    say "PREFLIGHT FAILED: $*"
    echo "FAIL preflight: $*" > "$OUT/summary.txt"
    exit 2
}

# stage NAME SECONDS CMD...: run CMD under its own timeout (capped by what is left of the total),
# append its output to the log and its verdict to the summary.
stage() {
    local name=$1 budget=$(($2 * SCALE)) left rc t0 verdict
    shift 2
    left=$((TOTAL - (SECONDS - START)))
    if (( left < 5 )); then
        verdict="FAIL $name (not run: the total budget of ${TOTAL}s is spent)"
    else
        (( budget > left )) && budget=$left
        echo "===== $name (timeout ${budget}s): $*" >> "$LOG"
        t0=$SECONDS
        timeout --kill-after=10 "$budget" "$@" >> "$LOG" 2>&1
        rc=$?
        if (( rc == 0 )); then
            verdict="PASS $name ($((SECONDS - t0))s)"
        elif (( rc == 124 || rc == 137 )); then
            verdict="FAIL $name (timed out after ${budget}s)"
        else
            verdict="FAIL $name (exit $rc after $((SECONDS - t0))s; see gpu_check.log)"
        fi
    fi
    [[ $verdict == FAIL* ]] && FAILED=1
    RESULTS+=("$verdict")
    echo "===== $verdict" >> "$LOG"
    echo "$verdict"
}

# ------------------------------------------------------------------ preflight (seconds)
say "$(date -u '+%Y-%m-%d %H:%M UTC') $([[ $REHEARSE == 1 ]] && echo 'CPU REHEARSAL' || echo 'GPU run'), OUT=$OUT, budget ${TOTAL}s"
if (( REHEARSE )); then
    say "rehearsal: GPU, nvcc and ninja checks skipped"
else
    command -v nvidia-smi > /dev/null || abort "no nvidia-smi: this machine has no NVIDIA driver"
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || abort "nvidia-smi fails (see nvidia-smi.txt): no usable GPU"
    # What the extension build needs only costs the extension's stages when missing, not the run.
    NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
    if [[ -n "$NVCC" ]]; then
        export PATH="$(dirname "$NVCC"):$PATH"
        # torch finds the CUDA headers through CUDA_HOME, else nvcc's grandparent folder: wrong when
        # nvcc is a wrapper script in /usr/local/bin. Take the first folder that holds the headers.
        if [[ -z "${CUDA_HOME:-}" ]]; then
            for home in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda-*; do
                if [[ -f "$home/include/cuda_runtime_api.h" ]]; then export CUDA_HOME=$home; break; fi
            done
        fi
        say "nvcc $NVCC ($("$NVCC" --version | tail -n 1)), CUDA_HOME=${CUDA_HOME:-unset (torch guesses)}"
    else
        say "WARNING: no nvcc: the optimizer extension cannot build its CUDA kernels (optim, train, FSDP stages fail)"
    fi
    command -v ninja > /dev/null || "$PY" -c "import ninja" 2> /dev/null \
        || say "WARNING: no ninja: the extension builds without it (slower)"
    say "$("$PY" -c 'import setuptools, sys; print("python", sys.version.split()[0], "setuptools", setuptools.__version__)')"
fi
shopt -s nullglob
wheels=("$WHEELS"/bitsandbytes-0.50.2-*.whl "$WHEELS"/torchao-0.18.0-*.whl)
shopt -u nullglob
if (( ${#wheels[@]} != 2 && ! REHEARSE )); then
    abort "carried wheels missing: $WHEELS/ must hold bitsandbytes-0.50.2-*.whl and torchao-0.18.0-*.whl (copy ../shared/wheels/gpu/*.whl there and name .gpu-wheels in carry)"
fi
"$PY" - >> "$LOG" 2>&1 <<'PY' || abort "torch cannot use the device (see gpu_check.log)"
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
if os.environ["QLORA_FAST_TEST_DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
PY

# the carried peers, installed beside (not over) the machine's packages
SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
if (( ${#wheels[@]} == 2 )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}" >> "$LOG" 2>&1 \
        || abort "the carried wheels in $WHEELS/ do not install (see gpu_check.log)"
    export PYTHONPATH="$SITE:$PYTHONPATH"
    WHEEL_SITE=$SITE
else
    say "rehearsal: no carried wheels in $WHEELS/ (set GPU_WHEELS): the installed peers are imported instead"
    WHEEL_SITE=""
fi
# the qlora_fast/kernels -> ../kernels link is local (not in git): the GPU machine's copy lacks it
(( REHEARSE )) || [[ -e qlora_fast/kernels ]] || ln -s ../kernels qlora_fast/kernels
"$PY" -c "import qlora_fast.kernels.lora, qlora_fast.kernels.nf4, qlora_fast.kernels.nf4_matmul" >> "$LOG" 2>&1 \
    || abort "qlora_fast.kernels does not import (see gpu_check.log)"
# the peers: a missing one costs its figures only (each benchmark names what it could not import)
WHEEL_SITE="$WHEEL_SITE" "$PY" - >> "$LOG" 2>&1 <<'PY' || say "WARNING: a peer does not import as carried (see gpu_check.log): its figures will be missing"
import os
import bitsandbytes, peft, transformers, torchao
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: F401 (0.18's path)
site = os.environ["WHEEL_SITE"]
for mod, want in ((bitsandbytes, "0.50.2"), (torchao, "0.18.0")):
    print(mod.__name__, mod.__version__, mod.__file__)
    assert mod.__version__.startswith(want), f"{mod.__name__} {mod.__version__} is not the carried {want}"
    assert not site or mod.__file__.startswith(site), f"{mod.__name__} imported from {mod.__file__}, not the wheel"
print("peft", peft.__version__, "transformers", transformers.__version__)
PY
# one trivial Triton kernel: an environment that cannot build Triton's launcher (no C compiler,
# Python.h or libcuda) is named now, not after every stage has timed out
"$PY" bench/gpu.py --smoke $TINY >> "$LOG" 2>&1 || abort "Triton cannot compile or launch a kernel here (see gpu_check.log)"
say "preflight ok ($((SECONDS - START))s)"

# ------------------------------------------------------------------ stages
XDIST=""
if (( ! REHEARSE )) && "$PY" -c "import xdist" 2> /dev/null; then
    XDIST="-n 8"  # the Triton compiles of many specializations dominate: spread them over cores
fi
# the extension builds in the background while the kernel tests (which do not need it) compile
BUILD_LOG="$SITE/build.log"
BUILD_CMD=("$PY" setup.py build_ext --inplace)
# rehearsing, the CPU build is `make install`'s (pip install -e .): only the plumbing runs
(( REHEARSE )) && BUILD_CMD=("$PY" -c "print('rehearsal: no build here (make install built it)')")
# in a session of its own, so that a build that outlives its stage can be stopped whole
SETSID=$(command -v setsid || true)
MAX_JOBS=6 $SETSID bash -c "$(printf '%q ' "${BUILD_CMD[@]}") > $(printf '%q' "$BUILD_LOG") 2>&1; \
    echo \"build exit \$?\" >> $(printf '%q' "$BUILD_LOG")" &
BUILD_PID=$!

if (( REHEARSE )); then  # CI runs the kernel files in full; the rehearsal adds their gpu-marked cases
    stage "kernel tests (gpu-marked, CPU rehearsal)" 120 "$PY" -m pytest -q -ra -m gpu $PYTEST_DEVICE_ARGS $KERNEL_TESTS
else
    stage "kernel tests on CUDA (compiled Triton)" 120 "$PY" -m pytest -q -ra $XDIST -p no:cacheprovider $KERNEL_TESTS
fi

wait_build() {  # the build is not this shell's child inside `timeout`: poll for its last line
    until grep -q "^build exit " "$BUILD_LOG" 2> /dev/null; do sleep 1; done
    cat "$BUILD_LOG"
    grep -q "^build exit 0$" "$BUILD_LOG"
}
stage "extension build" 150 bash -c "$(declare -f wait_build); BUILD_LOG=$BUILD_LOG wait_build"
# a build still running would compete with the benchmarks for the CPU (and skew host times)
grep -q "^build exit " "$BUILD_LOG" 2> /dev/null || kill -- -"$BUILD_PID" 2> /dev/null
stage "extension check (in-tree build with CUDA kernels, no JIT)" 60 "$PY" - <<'PY'
import os, torch
from qlora_fast import _extension
assert not _extension._stale_in_tree_build(), "qlora_fast._C was built from other sources than csrc/: a JIT build would follow"
from qlora_fast import _C  # the in-tree build itself, not the JIT fallback
print("qlora_fast._C:", _C.__file__)
if os.environ["QLORA_FAST_TEST_DEVICE"] == "cuda":
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qlora_fast::adam_step_", "CUDA"), "no CUDA kernels in _C"
PY
[[ ${RESULTS[-1]} == PASS* ]] && EXT_OK=1 || EXT_OK=0
if (( ! EXT_OK && ! REHEARSE )); then
    # setup.py's build failed (its FAIL stands): the JIT build (torch.utils.cpp_extension.load, no
    # pyproject or setuptools involved) can still give the optimizer and training stages their op
    stage "extension JIT build (fallback)" 150 "$PY" - <<'PY'
import torch
import qlora_fast
qlora_fast.load_extension()
assert torch._C._dispatch_has_kernel_for_dispatch_key("qlora_fast::adam_step_", "CUDA"), "no CUDA kernels in _C"
PY
    [[ ${RESULTS[-1]} == PASS* ]] && EXT_OK=1
fi

# On the GPU each area runs in its own process (a CUDA fault in one cannot poison the others' context);
# rehearsing, one process runs them all (the peers' imports cost ~8 s a process on a CPU).
# each includes ~10-15 s of imports (torch, CUDA, the peers) and Triton compiles on a cold cache
declare -A AREA_BUDGET=([quant]=45 [matmul]=50 [lora]=45 [optim]=50 [train]=100 [grpo]=90 [reasoning]=40)
if (( REHEARSE )); then GROUPS_=("$AREAS"); else read -r -a GROUPS_ <<< "$AREAS"; fi
for group in "${GROUPS_[@]}"; do
    budget=0
    runnable=()
    for area in $group; do
        if [[ $area == optim || $area == train || $area == grpo ]] && (( ! EXT_OK )) && [[ ${GPU_CHECK_KEEP_GOING:-0} != 1 ]]; then
            RESULTS+=("FAIL bench $area (not run: needs the extension)")
            FAILED=1
            continue
        fi
        runnable+=("$area")
        budget=$((budget + ${AREA_BUDGET[$area]:-60}))
    done
    (( ${#runnable[@]} )) || continue
    stage "bench ${runnable[*]}" "$budget" "$PY" bench/gpu.py --areas "${runnable[@]}" $TINY --out-dir "$OUT"
done

# after the figures (the issue's goals; each benchmark checks its results too): the gpu-marked tests,
# test_optim_gpu.py's CUDA optimizer op against the CPU op among them
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | grep -v -F -x $(printf -- '-e %s ' $KERNEL_TESTS) | tr '\n' ' ')
if (( EXT_OK )) || [[ ${GPU_CHECK_KEEP_GOING:-0} == 1 ]]; then
    stage "gpu-marked tests ($GPU_TESTS)" 60 "$PY" -m pytest -q -ra -m gpu $PYTEST_DEVICE_ARGS -p no:cacheprovider $GPU_TESTS
else
    RESULTS+=("FAIL gpu-marked tests (not run: the extension is not right; GPU_CHECK_KEEP_GOING=1 runs them anyway)")
    FAILED=1
fi

# FSDP2 on one device (issue 15), world size 1 (NCCL on the GPU, gloo when rehearsing):
# bench/gpu_fsdp.py trains a model whose every 4-bit layer is sharded (ShardableLinear4bit) against the
# same model unsharded and round-trips a DCP checkpoint; then `finetune --fsdp --nproc 1` trains 2
# steps, writes a sharded checkpoint and `--resume` continues it. Last: the benchmarks keep the budget.
FSDP_DEVICE=cuda
(( REHEARSE )) && FSDP_DEVICE=cpu
if (( EXT_OK )) || [[ ${GPU_CHECK_KEEP_GOING:-0} == 1 ]]; then
    fsdp_run=("$PY" -m qlora_fast.cli finetune --fsdp --nproc 1 --device "$FSDP_DEVICE" --checkpoint-every 2
              --pretrain-steps 20 --eval-pairs 4 --cache-dir "$OUT/fsdp-cache" --output "$OUT/fsdp" --no-progress)
    stage "FSDP2 one-device training + DCP resume" 90 bash -c "$(printf '%q ' "$PY" bench/gpu_fsdp.py $TINY) && \
        $(printf '%q ' "${fsdp_run[@]}") --max-steps 2 && $(printf '%q ' "${fsdp_run[@]}") --max-steps 3 --resume"
else
    RESULTS+=("FAIL FSDP2 one-device training (not run: needs the extension)")
    FAILED=1
fi

# ------------------------------------------------------------------ summary
{
    echo "gpu_check summary ($([[ $REHEARSE == 1 ]] && echo 'CPU rehearsal' || echo 'GPU'), $((SECONDS - START))s of ${TOTAL}s):"
    printf '  %s\n' "${RESULTS[@]}"
    (( FAILED )) && echo "RESULT: FAIL" || echo "RESULT: PASS"
} | tee "$OUT/summary.txt" | tee -a "$LOG"
if [[ -f "$OUT/bench.log" ]] && (( ! REHEARSE )); then
    echo "--- bench figures (bench.log, tail) ---"
    grep -v "^    \|Traceback\|^  File" "$OUT/bench.log" | tail -n 60
    cat "$OUT/summary.txt"  # last, so the device tool's output tail ends with it
fi
exit $FAILED
