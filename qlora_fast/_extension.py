"""Find the compiled optimizer extension `qlora_fast._C`, or build it on first use.

Order: the module built into the wheel / editable install (unless csrc/ has changed since that
in-place build); else a JIT build of `csrc/` with
`torch.utils.cpp_extension.load` (ninja) into a cache directory
(`$QLORA_FAST_EXTENSION_DIR`, default `~/.cache/qlora_fast/extensions/<torch build>`); else an
ImportError that says what is missing. The CUDA kernels join the JIT build when torch has CUDA,
nvcc is found and QLORA_FAST_SKIP_CUDA_BUILD is not 1. Either way the ops are registered as
`torch.ops.qlora_fast.*`.
"""
import os
import shutil
import threading
from pathlib import Path

_LOCK = threading.Lock()
_MODULE = None

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("optim.cpp", "adamw_cpu.cpp")
CUDA_SOURCES = ("optim_cuda.cpp", "adamw.cu")
HEADERS = ("adam_common.h", "optim.h", "adamw_cuda.h")
HASHED = HEADERS + CPU_SOURCES + CUDA_SOURCES
CXX_FLAGS = ["-O3", "-fno-math-errno"]  # no errno lets sqrtf vectorise; results unchanged
# -fmad=false: no fused multiply-adds, so the CUDA kernels round every operation as the CPU path
# does (bit-identical results, one checked reference); the update is memory-bound, so FMAs buy nothing
NVCC_FLAGS = ["-O3", "-lineinfo", "-fmad=false"]
# setup.py reads the lists, flags and `source_hash` above from this file (it keeps its top-level
# imports to the standard library for that), so the wheel's build and the JIT build agree.


def cache_dir() -> Path:
    """Where JIT builds go: one folder per torch version and CUDA build."""
    import torch

    root = os.environ.get("QLORA_FAST_EXTENSION_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "qlora_fast", "extensions"
    )
    flavour = f"torch{torch.__version__.replace('+', '_')}-{'cu' + torch.version.cuda if torch.version.cuda else 'cpu'}"
    return Path(root) / flavour


def _want_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("QLORA_FAST_SKIP_CUDA_BUILD", "0") == "1" or not torch.cuda.is_available():
        return False
    home = cpp_extension.CUDA_HOME
    nvcc = home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    return nvcc and all((CSRC / s).exists() for s in CUDA_SOURCES)


def _jit_build(import_error: Exception):
    from torch.utils import cpp_extension

    missing = []
    if not all((CSRC / s).exists() for s in CPU_SOURCES):
        missing.append(f"the C++ sources ({', '.join(CPU_SOURCES)} in {CSRC}; only a source checkout has them)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        missing.append("a C++ compiler (set CXX or install g++/clang++)")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        missing.append("ninja (pip install ninja)")
    if missing:
        raise ImportError(
            "qlora_fast._C (the optimizer extension) is not built into this install "
            f"({import_error}) and cannot be built now: missing " + "; ".join(missing)
        ) from import_error
    sources = [str(CSRC / s) for s in CPU_SOURCES]
    with_cuda = _want_cuda()
    if with_cuda:
        sources += [str(CSRC / s) for s in CUDA_SOURCES]
    build_dir = cache_dir() / ("cuda" if with_cuda else "cpu")
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name="_C",
            sources=sources,
            extra_cflags=CXX_FLAGS + [f"-DQLORA_FAST_SOURCE_HASH={source_hash()}"],
            extra_cuda_cflags=NVCC_FLAGS,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            verbose=os.environ.get("QLORA_FAST_VERBOSE_BUILD", "0") == "1",
        )
    except Exception as build_error:  # the compiler's message is in the chained error
        raise ImportError(
            f"qlora_fast._C is not built into this install ({import_error}) and the JIT build in "
            f"{build_dir} failed: {build_error}"
        ) from build_error


def source_hash() -> str:
    """Hash of the optimizer sources in csrc/, compiled into `_C` (by setup.py and the JIT build)
    so that a stale in-place build is detected."""
    import hashlib

    digest = hashlib.sha256()
    for name in HASHED:
        path = CSRC / name
        if path.exists():
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes())
    return "h" + digest.hexdigest()[:32]


_MARKER = b"qlora_fast_source_hash:"


def _stale_in_tree_build() -> bool:
    """True when this is a source checkout whose csrc/ differs from the sources the importable
    `_C` was built from (its hash is read from the file, before loading it): importing it would
    silently run old code, so the JIT build is used instead."""
    import importlib.util

    if not (CSRC / CPU_SOURCES[0]).exists():
        return False  # an installed wheel: nothing to compare with
    spec = importlib.util.find_spec("qlora_fast._C")
    if spec is None or not spec.origin:
        return False
    data = Path(spec.origin).read_bytes()
    at = data.find(_MARKER)
    if at < 0:
        return True  # built before hashes were recorded
    built = data[at + len(_MARKER): at + len(_MARKER) + 33].decode("ascii", "replace")
    return built != source_hash()


def load():
    """The optimizer extension module; its ops are `torch.ops.qlora_fast.adam_step_` and
    `torch.ops.qlora_fast.adam8bit_step_`. Raises ImportError naming what is missing."""
    global _MODULE
    with _LOCK:
        if _MODULE is None:
            try:
                if _stale_in_tree_build():
                    raise ImportError("the in-place qlora_fast._C was built from other sources than csrc/ "
                                      "(rebuild with pip install -e .)")
                from qlora_fast import _C as module
            except ImportError as import_error:
                module = _jit_build(import_error)
            _MODULE = module
        return _MODULE
