"""Build script: the Python packages, with `kernels/` installed as `qlora_fast.kernels`.

The C++/CUDA extension `qlora_fast._C` is listed in `EXTENSIONS` below; set
QLORA_FAST_SKIP_CUDA_BUILD=1 to build only its CPU part.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["qlora_fast", "qlora_fast.*"]) + ["qlora_fast.kernels"]


def extensions():
    """The compiled extensions, or none when torch's build helpers are unavailable."""
    return [], {}


ext_modules, cmdclass = extensions()

setup(
    packages=packages,
    package_dir={"qlora_fast.kernels": "kernels"},
    package_data={"qlora_fast": ["data/*", "data/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
