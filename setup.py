"""Build script: the Python packages, with `kernels/` installed as `qlora_fast.kernels`, and the
compiled extensions: `qlora_fast._C` (optimizers; CUDA part skipped when there is no CUDA torch
or QLORA_FAST_SKIP_CUDA_BUILD=1) and `qlora_fast._bpe` (the BPE merge loop)."""
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
packages = find_packages(include=["qlora_fast", "qlora_fast.*"]) + ["qlora_fast.kernels"]


def _exists(path):
    return os.path.exists(os.path.join(HERE, path))


def _load_extension_config():
    """qlora_fast/_extension.py, loaded by path (not by importing the package): the source
    lists, flags and source hash shared with the JIT build."""
    spec = importlib.util.spec_from_file_location(
        "_qlora_fast_extension", os.path.join(HERE, "qlora_fast", "_extension.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_EXT = _load_extension_config()
OPTIM_CPU_SOURCES = [f"csrc/{s}" for s in _EXT.CPU_SOURCES]
OPTIM_CUDA_SOURCES = [f"csrc/{s}" for s in _EXT.CUDA_SOURCES]


def _cuda_build_wanted(cpp_extension):
    """Build the CUDA kernels only with a CUDA torch, an nvcc, and no QLORA_FAST_SKIP_CUDA_BUILD=1."""
    import torch

    if os.environ.get("QLORA_FAST_SKIP_CUDA_BUILD", "0") == "1" or torch.version.cuda is None:
        return False
    return cpp_extension.CUDA_HOME is not None and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


def _compiler_available():
    import shutil
    import sysconfig

    cxx = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    return shutil.which(cxx) is not None or shutil.which("c++") is not None


def optim_extension(cpp_extension):
    """The optimizer extension `qlora_fast._C` (CPU always, CUDA when wanted), or None when its
    sources or a C++ compiler are missing: the package then JIT-builds it on first use."""
    if not all(_exists(s) for s in OPTIM_CPU_SOURCES) or not _compiler_available():
        return None
    if _cuda_build_wanted(cpp_extension) and all(_exists(s) for s in OPTIM_CUDA_SOURCES):
        return cpp_extension.CUDAExtension(
            "qlora_fast._C",
            OPTIM_CPU_SOURCES + OPTIM_CUDA_SOURCES,
            extra_compile_args={"cxx": _EXT.CXX_FLAGS, "nvcc": _EXT.NVCC_FLAGS},
            define_macros=[("QLORA_FAST_SOURCE_HASH", _EXT.source_hash())],
            optional=True,  # a failed build warns; the package then JIT-builds on first use
        )
    return cpp_extension.CppExtension(
        "qlora_fast._C", OPTIM_CPU_SOURCES, extra_compile_args=_EXT.CXX_FLAGS, optional=True,
        define_macros=[("QLORA_FAST_SOURCE_HASH", _EXT.source_hash())],
    )


def bpe_extension(cpp_extension):
    """The BPE merge-loop extension `qlora_fast._bpe`, or None until its source exists."""
    if not _exists("csrc/bpe.cpp"):
        return None
    return cpp_extension.CppExtension("qlora_fast._bpe", ["csrc/bpe.cpp"], extra_compile_args=["-O3"])


def extensions():
    """The compiled extensions, or none when torch's build helpers are unavailable."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    exts = [e for e in (optim_extension(cpp_extension), bpe_extension(cpp_extension)) if e is not None]
    return exts, ({"build_ext": cpp_extension.BuildExtension} if exts else {})


ext_modules, cmdclass = extensions()

setup(
    packages=packages,
    package_dir={"qlora_fast.kernels": "kernels"},
    package_data={"qlora_fast": ["data/*", "data/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
