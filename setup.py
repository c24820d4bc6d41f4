"""Build script: the Python packages, with `kernels/` installed as `qlora_fast.kernels`, and the
compiled extensions: `qlora_fast._C` (optimizers; CUDA part skipped when there is no CUDA torch
or QLORA_FAST_SKIP_CUDA_BUILD=1) and `qlora_fast._bpe` (the BPE merge loop)."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
packages = find_packages(include=["qlora_fast", "qlora_fast.*"]) + ["qlora_fast.kernels"]


def _exists(path):
    return os.path.exists(os.path.join(HERE, path))


def optim_extension(cpp_extension):
    """The optimizer extension `qlora_fast._C`, or None until its sources exist."""
    return None


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
