"""qlora_fast.utils.atomic_write: the new file appears whole, a failed write leaves the old file
and no temp file behind, and missing directories are created."""
import os

import pytest

from qlora_fast.utils import atomic_write, atomic_write_bytes


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "dir" / "data.bin"
    first, second = os.urandom(97), os.urandom(1031)
    atomic_write_bytes(path, first)
    assert path.read_bytes() == first
    atomic_write(str(path), lambda f: f.write(second))
    assert path.read_bytes() == second
    assert os.listdir(path.parent) == ["data.bin"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "data.bin"
    old = os.urandom(64)
    path.write_bytes(old)

    def write_then_fail(f):
        f.write(os.urandom(64))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, write_then_fail)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["data.bin"]


def test_stale_temporary_symlink_is_unlinked_not_followed(tmp_path):
    # an older save's exchange left a temp *link* to the adapter: the link goes, its target stays
    from helpers import dead_pid

    from qlora_fast.utils import clean_stale_temporaries

    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "data.bin").write_bytes(b"kept")
    link = tmp_path / f".tmp-{dead_pid()}-latest-abc"
    os.symlink("run1", link)
    assert clean_stale_temporaries(tmp_path) == [str(link)]
    assert os.listdir(tmp_path) == ["run1"] and (tmp_path / "run1" / "data.bin").read_bytes() == b"kept"
