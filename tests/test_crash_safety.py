"""A kill or a full disk at any instant leaves what the same command resumes or finishes, and every message about
what is found says exactly that: the writer lock's record, an HDF5 cache's creation and finish, paths that hold no
cache, and each command's advice after an interrupt."""

import errno
import os

import numpy as np
import pytest

from kdcache.cache import CacheWriter
from kdcache.cache.lock import WriterLock, lock_path
from kdcache.errors import KdcacheError


def test_a_full_disk_when_the_lock_records_its_holder_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    cache = tmp_path / "c.zarr"
    write = os.write

    def full_disk(fd, data):
        if os.fstat(fd).st_ino == os.stat(lock_path(cache)).st_ino:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(KdcacheError) as refused:
        WriterLock(cache).acquire()
    message = str(refused.value)
    assert "\n" not in message and "the disk is full: free space, then rerun the same command" in message
    assert str(lock_path(cache)) in message
    assert not lock_path(cache).exists()
    monkeypatch.setattr(os, "write", write)
    with WriterLock(cache):  # the rerun takes it
        assert lock_path(cache).exists()
