"""Small helpers shared across qlora_fast. Imports the standard library only, so any layer may use it."""
import os
import tempfile
from typing import BinaryIO, Callable, Union


def default_cache_dir() -> str:
    """Where qlora_fast caches what it builds on first use (the shipped BPE, the built-in base
    model): $QLORA_FAST_CACHE, else ~/.cache/qlora_fast."""
    return os.environ.get("QLORA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora_fast")


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], object]) -> None:
    """Write the file `path` atomically: `write(f)` fills a binary file open on a temp file in the
    same directory (created if missing), which is flushed, fsynced and `os.replace`d onto `path`.

    A crash or an exception in `write` leaves any previous `path` intact; the temp file is removed
    and the exception propagates.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> None:
    """Write `data` to the file `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def lazy_getattr(package: str, names: dict):
    """A module `__getattr__` that imports `names[attr]` (a module path) on first access, so a
    package's `__init__` can list its public names without importing heavy submodules."""
    import importlib

    def __getattr__(attr):
        module = names.get(attr)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        return getattr(importlib.import_module(module), attr)

    return __getattr__
