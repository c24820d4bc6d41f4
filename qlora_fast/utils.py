"""Small helpers shared across qlora_fast. Imports the standard library only, so any layer may use it."""
import contextlib
import ctypes
import errno
import math
import os
import re
import shutil
import tempfile
import time
from typing import BinaryIO, Callable, Optional, Union


def default_cache_dir() -> str:
    """Where qlora_fast caches what it builds on first use (the shipped BPE, the built-in base
    model): $QLORA_FAST_CACHE, else ~/.cache/qlora_fast."""
    return os.environ.get("QLORA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora_fast")


# Temp files are named ".tmp-<pid>-<random><name>": the pid says whether their writer still runs.
_TMP_PREFIX = ".tmp-"
_TMP_PATTERN = re.compile(r"^\.tmp-(\d+)-")
_LEGACY_TMP_AGE_S = 3600.0  # temp files without a pid (older versions) count as stale after an hour


def _umask() -> int:
    try:  # Linux: read it, since setting it to probe would race with other threads creating files
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def temp_prefix() -> str:
    """The name prefix of this process's temp files and directories (".tmp-<pid>-"): use it for a
    temporary that is renamed into place, so `clean_stale_temporaries` can tell when it is stale."""
    return f"{_TMP_PREFIX}{os.getpid()}-"


def clean_stale_temporaries(directory: Union[str, os.PathLike]) -> list:
    """Remove the temporaries that a killed writer left in `directory`: files and directories
    named `temp_prefix()` by a process that no longer runs, and (older versions) ".tmp-*" files
    without a pid older than an hour. Returns the removed paths. The pid is local to this host:
    on a directory shared between machines, give each run its own output directory."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not name.startswith(_TMP_PREFIX):
            continue
        path = os.path.join(directory, name)
        m = _TMP_PATTERN.match(name)
        try:
            stale = not _pid_alive(int(m.group(1))) if m else now - os.path.getmtime(path) > _LEGACY_TMP_AGE_S
            if stale and (os.path.isfile(path) or os.path.islink(path)):  # a link: itself, never its target
                os.unlink(path)
                removed.append(path)
            elif stale and m and os.path.isdir(path) and not os.path.islink(path):
                import shutil

                shutil.rmtree(path)
                removed.append(path)
        except OSError:  # raced with another cleaner, or not ours to remove
            pass
    return removed


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], object]) -> None:
    """Write the file `path` atomically: `write(f)` fills a binary file open on a temp file in the
    same directory (created if missing), which is flushed, fsynced and `os.replace`d onto `path`.
    The file gets the mode a plain `open()` would give (0666 less the umask), not mkstemp's 0600.

    A crash or an exception in `write` leaves any previous `path` intact; the temp file is removed
    and the exception propagates. Temp files of killed writers are cleaned up on the next write.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_stale_temporaries(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(), suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


# ---------------------------------------------------------------------------- directories
def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _carry_over(old: str, new: str) -> None:
    """Files of the old directory that are not ours (a README, a tokenizer) move with it (hard
    links where possible, so nothing is copied)."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(dst):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(src, dst)


def atomic_write_dir(path: Union[str, os.PathLike], files: dict, what: str = "directory") -> None:
    """Make directory `path` hold `files` ({name: bytes}) in one atomic step: they are written
    into a fresh temporary directory beside `path`, which then takes its place in one rename
    (Linux `renameat2(RENAME_EXCHANGE)` when `path` exists, two renames elsewhere, where a crash
    between them leaves the previous directory whole as ".old-<pid>-<name>-..." beside it). Files
    of a previous `path` that are not in `files` (a README, a tokenizer) are kept. On any error
    the previous `path` is untouched and nothing is left behind. A symlinked `path` keeps its
    link: the directory it points to is replaced. `what` names `path` in errors."""
    path = os.path.realpath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temporaries(parent)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{temp_prefix()}{os.path.basename(path)}-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a saved directory follows the umask
        for name, data in files.items():
            _write_file(os.path.join(tmp, name), data)
        if not os.path.isdir(path):
            os.rename(tmp, path)
        else:
            _carry_over(path, tmp)
            if not _exchange(tmp, path):  # on success tmp holds the previous directory
                # Two renames. Between them the old directory is the only copy, so its name is not a
                # temporary's (no cleaner takes it): a crash there leaves it beside `path` as ".old-...".
                old = os.path.join(parent, ".old-" + os.path.basename(tmp)[len(".tmp-"):])
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable_dir(path: Union[str, os.PathLike], what: str = "output directory") -> str:
    """Create the directory `path` if needed and prove it writable by writing and removing a temp
    file, so a run fails before any work rather than at its first save. Returns the path.
    Raises NotADirectoryError / PermissionError / OSError naming `what` and the path."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=temp_prefix(), suffix="write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        error = type(e)(f"{what} {path!r} is not writable: {e.strerror or e}")
        error.errno = e.errno
        raise error from e
    return path


_HELD_LOCKS: dict = {}  # realpath -> [open file, count]: the lock is re-entrant within a process


@contextlib.contextmanager
def output_lock(directory: Union[str, os.PathLike], what: str = "output directory"):
    """Hold an exclusive lock on `directory` (fcntl.flock on `<directory>/.qlora_fast.lock`) while
    the block runs, so two runs cannot write the same outputs; a second run raises BlockingIOError (an OSError)
    naming the directory and the holder's pid. The kernel drops the lock when its process dies,
    so a killed run never leaves a stale lock. Re-entrant within one process; a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    key = os.path.realpath(check_writable_dir(directory, what))
    held = _HELD_LOCKS.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    f = open(os.path.join(key, ".qlora_fast.lock"), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise BlockingIOError(f"{what} {os.fspath(directory)!r} is in use by another run (pid {holder}); "
                           "wait for it, or choose another directory") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD_LOCKS[key] = [f, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        f.close()  # releases the flock


def check_finite_state(state: dict, what: str) -> None:
    """Raise FloatingPointError naming the first tensor of `state` ({name: tensor}) holding NaN or
    inf, so `what` (an adapter, a checkpoint) is never written with non-finite values."""
    for name, t in state.items():
        if hasattr(t, "is_floating_point") and t.is_floating_point() and t.numel() and not bool(t.isfinite().all()):
            bad = int((~t.isfinite()).sum())
            raise FloatingPointError(f"refusing to write {what}: {name} holds {bad} NaN/inf value(s) of {t.numel()}")


def check_number(owner: str, name: str, value, *, integer: bool = False, minimum=None, maximum=None,
                 exclusive_minimum: bool = False, optional: bool = False):
    """Validate one hyperparameter: a (non-bool) int when `integer`, else a finite real; within
    [minimum, maximum] (minimum excluded when `exclusive_minimum`); None allowed when `optional`.
    Raises ValueError/TypeError as "<owner>.<name> must be ..., got <value>". Returns the value."""
    if value is None and optional:
        return value
    kind = "an int" if integer else "a finite number"
    # True is an int to Python and "1e-3" converts to a float: neither is a hyperparameter value
    if isinstance(value, (bool, str, bytes)) or type(value).__name__ == "bool_":
        raise TypeError(f"{owner}.{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    if not (isinstance(value, int) if integer else isinstance(value, (int, float))):
        # numpy / torch scalars: accept when they convert exactly
        try:
            converted = int(value) if integer else float(value)
            if integer and converted != value:
                raise ValueError
        except (TypeError, ValueError):
            raise TypeError(f"{owner}.{name} must be {kind}{' or None' if optional else ''}, got {value!r}") from None
        value = converted
    if not integer and not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be {kind}, got {value!r}")
    low_bad = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if low_bad or (maximum is not None and value > maximum):
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        raise ValueError(
            f"{owner}.{name} must be {kind} {' and '.join(bounds)}{' (or None)' if optional else ''}, got {value!r}"
        )
    return value


# ---------------------------------------------------------------------------- renamed names
def warn_renamed(old: str, new: str, stacklevel: int = 2) -> None:
    """The one DeprecationWarning of a renamed argument, field or attribute (kept for one release)."""
    import warnings

    warnings.warn(f"{old} is deprecated: use {new} (the old name goes in the next release)", DeprecationWarning,
                  stacklevel=stacklevel + 1)


def renamed_kwargs(owner: str, renames: dict):
    """Decorator for a callable whose keyword arguments were renamed: each old name in `renames`
    (old -> new, or old -> (new, convert) when the old meaning needs converting) still works for
    one release, with a DeprecationWarning naming the new one. Passing both is a TypeError."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, spec in renames.items():
                if old not in kwargs:
                    continue
                new, convert = spec if isinstance(spec, tuple) else (spec, None)
                if new in kwargs:
                    raise TypeError(f"{owner}() got both {new}= and its deprecated name {old}=; pass {new}= only")
                warn_renamed(f"{owner}({old}=...)", f"{new}=")
                value = kwargs.pop(old)
                kwargs[new] = convert(value) if convert is not None else value
            return fn(*args, **kwargs)

        return call

    return wrap


def renamed_argument(owner: str, old: str, new: str, old_value, new_value):
    """The value of argument `new`, taking the deprecated `old` (with a DeprecationWarning) when given
    instead; TypeError when both are."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{owner}: give {new} only ({old} is its deprecated name)")
    warn_renamed(f"{owner}.{old}", new, 2)
    return old_value


def renamed_fields(**renamed):
    """Class decorator for a config dataclass: for each old=new, `old` keeps working for one release
    (DeprecationWarning) as a constructor keyword and as an attribute. Given with the new name too
    (dataclasses.replace(config, old=value) passes both), the old name's value wins: it is the one
    the caller wrote. Subclasses must be decorated again (dataclass writes them a new __init__);
    they inherit the names."""
    import functools

    def alias(old, new):
        def get(self):
            warn_renamed(f"{type(self).__name__}.{old}", new)
            return getattr(self, new)

        def set_(self, value):
            warn_renamed(f"{type(self).__name__}.{old}", new)
            setattr(self, new, value)

        return property(get, set_, doc=f"Deprecated alias of `{new}`.")

    def decorate(cls):
        names = {**getattr(cls, "_renamed_fields", {}), **renamed}
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            given = [old for old in names if old in kwargs]
            for old in given:
                warn_renamed(f"{cls.__name__}.{old}", names[old])
                kwargs[names[old]] = kwargs.pop(old)
            try:
                init(self, *args, **kwargs)
            except (TypeError, ValueError) as e:  # name the spelling the caller used, too
                if not given or type(e) not in (TypeError, ValueError):
                    raise
                raise type(e)(f"{e} ({', '.join(f'{names[o]} given as {o}' for o in given)})") from e

        for old, new in renamed.items():
            setattr(cls, old, alias(old, new))
        cls.__init__, cls._renamed_fields = __init__, names
        return cls

    return decorate


def read_json(path: Union[str, os.PathLike], what: Optional[str] = None):
    """json.load of the file `path`; a truncated or corrupt file raises ValueError naming it."""
    import json

    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what or 'file'} {path!r} is not valid JSON (truncated or corrupt?): {e}") from e


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
