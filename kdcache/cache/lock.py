"""One writer at a time: a kernel lock on a file beside the cache, or an exclusively created object beside a URL.

A local cache's lock is `fcntl.flock` on `<cache>.lock`, held for the writer's life: the kernel drops it
when the process ends in any way (kill -9, a power cut's reboot), so a lock is never stale and nothing is
ever taken over. The file also holds a JSON record of the holder (pid, host, start), read only to name
it when refusing a second writer. The path is resolved first, so a cache reached through a symlink takes
the same lock as its real path.

For a cache at a URL the lock is the object `<url>.lock` beside it, created exclusively where the
filesystem can (fsspec's "xb" mode: local files, memory://, and the object stores whose fsspec
backend implements it); elsewhere it is checked, then written, which two writers starting in the
same instant can both pass. There the record decides: a lock whose holder no longer runs on this host
is taken over.

A run folder and a sweep's summary.csv take the same lock (`<folder>.lock`, `summary.csv.lock`): a run holds
its folder for its life, and a summary's writer holds its lock while it adds its rows.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from kdcache.cache.location import Location, Place, url_filesystem
from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)
RECORD_WAIT_SECONDS = 2.0  # a holder writes its record right after taking the lock


def lock_path(cache_path: Place) -> str | Path:
    """The lock file of a cache: `<cache>.lock` beside its real path (for a URL, the URL of that object)."""
    location = Location.of(cache_path).resolved()
    if location.is_url:
        return location.url + ".lock"
    return location.path.with_name(location.name + ".lock")


class WriterLock:
    """An exclusive lock on a cache for one writing process."""

    def __init__(self, cache_path: Place) -> None:
        location = Location.of(cache_path)
        self.remote = location.is_url
        # a Path, or for a cache at a URL the lock's URL (then _fs and _fs_path reach it)
        self.path = lock_path(location)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self._fd: int | None = None  # the locked file's descriptor, while held
        if self.remote:
            self._fs, self._fs_path = url_filesystem(self.path)

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()

    def acquire(self) -> WriterLock:
        """Take the lock; refuse, naming the holder, while another process holds it."""
        if self.remote:
            return self._acquire_url()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _flock(self.path, fcntl.LOCK_EX)
        if fd is None:
            raise self._refusal(self._holders_record())
        try:
            os.ftruncate(fd, 0)
            os.write(fd, self._record())
        except OSError as error:  # a full disk: the lock file this process made goes, and nothing else was written
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise KdcacheError(f"could not write the writer lock {self.path} ({error}); "
                               f"{disk_full_hint(error)}, then rerun the same command") from error
        self._fd = fd
        return self

    def acquire_waiting(self, seconds: float) -> WriterLock:
        """Take the lock, waiting up to `seconds` while another process holds it (for a short write such as a
        summary's row); then refuse as acquire() does."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return self.acquire()
            except KdcacheError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _holders_record(self) -> dict | None:
        """The record of the process holding the lock, waiting briefly for a holder that has just taken it.

        The file may still hold the record of an earlier holder that died: where the kernel's lock table names
        the holder's pid (Linux's /proc/locks), only a record of that pid counts, and the pid alone is given if
        its record does not come in time.
        """
        kernel_pid = _flock_holder(self.path)
        deadline = time.monotonic() + RECORD_WAIT_SECONDS
        while True:
            holder = self._holder()
            if holder is not None and (kernel_pid is None or holder.get("pid") == kernel_pid):
                return holder
            if time.monotonic() > deadline:
                return None if kernel_pid is None else {"pid": kernel_pid, "host": socket.gethostname(),
                                                        "started": "a moment ago"}
            time.sleep(0.01)

    def _refusal(self, holder: dict | None) -> KdcacheError:
        """The error for a second writer, naming the holder when its record says who it is."""
        cache = self.path.removesuffix(".lock") if self.remote else self.path.with_suffix("")
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}" if holder
               else "it is starting and has not written its record yet")
        gone = (f"; if that process is gone, delete the lock object {self.path}" if self.remote else
                " (the lock is the kernel's: it is released when that process ends, however it ends)")
        return KdcacheError(f"{cache} is being written by another kdcache process ({who}); wait for it to "
                            f"finish{gone}")

    def _acquire_url(self) -> WriterLock:
        """acquire() for a lock object at a URL: the same owner record and messages."""
        record = self._record()
        try:
            self._create_exclusively(record)
        except FileExistsError:
            self._refuse_a_live_holder()
            self._fs.pipe_file(self._fs_path, record)  # one object written whole: no partial-then-rename needed
        return self

    def _refuse_a_live_holder(self) -> None:
        """The lock object exists: refuse while its holder runs; otherwise say that its stale lock is taken over."""
        holder = self._holder()
        if holder is not None and _alive(holder):
            raise self._refusal(holder)
        log.warning("taking over the stale lock %s of a process that no longer runs (%s)", self.path, holder)

    def _create_exclusively(self, record: bytes) -> None:
        """Write the lock object, raising FileExistsError if it exists (atomically where the filesystem can)."""
        self._fs.invalidate_cache(self._fs_path)
        try:
            with self._fs.open(self._fs_path, "xb") as file:  # a backend may check only when the file closes
                file.write(record)
            return
        except FileExistsError:
            raise
        except (NotImplementedError, ValueError) as error:  # this filesystem has no exclusive mode
            log.debug("%s: no exclusive create (%s); checking, then writing", self.path, error)
        if self._fs.exists(self._fs_path):
            raise FileExistsError(self.path)
        self._fs.pipe_file(self._fs_path, record)

    def release(self) -> None:
        """Drop the lock if this process holds it."""
        if not self.remote:
            if self._fd is not None:
                self.path.unlink(missing_ok=True)  # still held: a contender that opened it sees it is gone, and retries
                os.close(self._fd)
                self._fd = None
            return
        try:
            holder = self._holder()
        except OSError as error:  # a lock at a URL that cannot be read now (network, credentials)
            log.warning("could not release the lock %s (%s); delete it if no kdcache process writes the cache",
                        self.path, error)
            return
        if holder is not None and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            try:
                self._fs.rm(self._fs_path)
            except FileNotFoundError:
                pass
            self._fs.invalidate_cache(self._fs_path)

    def _holder(self) -> dict | None:
        """The holder's record, or None when there is none to read."""
        if self.remote:
            # only absence reads as "no holder" here: a lock that cannot be reached is not taken over
            self._fs.invalidate_cache(self._fs_path)
            try:
                return json.loads(self._fs.cat_file(self._fs_path))
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                return None
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # not written yet: its holder has the kernel lock and is about to write it

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def disk_full_hint(error: BaseException) -> str:
    """What to do about a failed write: free space when the disk is full, else fix the cause."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(error)
    return "the disk is full: free space" if full else "fix the cause"


def _alive(holder: dict) -> bool:
    """Whether the lock's owner still runs (a process on another host is assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _flock(path: Path, kind: int) -> int | None:
    """The descriptor of the file at path, flocked (kind: LOCK_EX or LOCK_SH) without waiting; None if refused.

    Never truncates: a holder's record stays. A holder that releases removes the file, so a lock taken on a file
    no longer at path is dropped and taken again on the one there now.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _is_the_file_at(fd, path):
            return fd
        os.close(fd)


def _is_the_file_at(fd: int, path: Path) -> bool:
    """Whether the open file is still the one at path (a releasing holder removes it)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _flock_holder(path: Path) -> int | None:
    """The pid holding an exclusive flock on the file, from Linux's /proc/locks; None where that table cannot tell."""
    holders = _flock_holders(path, "WRITE")
    return holders[0] if holders else None


def _flock_holders(path: Path, kind: str | None = None) -> list[int]:
    """The pids holding flocks (of `kind`, READ or WRITE, when given) on the file, from Linux's /proc/locks."""
    try:
        found = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    inode = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    return [int(fields[4]) for fields in map(str.split, table.splitlines())
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit()
            and kind in (None, fields[3])]

class ReadersLock:
    """Readers of a local cache hold a shared kernel lock on `<cache>.readers`; a writer that deletes or rewrites
    the store (--overwrite, a restart) takes it exclusively first, so it never pulls a cache from under a reader,
    and a reader never opens a cache that is being rewritten. At a URL there is none (nothing to flock)."""

    def __init__(self, cache_path: Place) -> None:
        location = Location.of(cache_path)
        self.path = None if location.is_url else lock_path(location).with_suffix(".readers")
        self._fd: int | None = None

    def share(self) -> ReadersLock:
        """Take the shared lock as a reader; refuse while a writer rewrites the cache."""
        if self._take(fcntl.LOCK_SH) is False:
            raise KdcacheError(f"{self.path.with_suffix('')} is being rewritten from scratch by another kdcache "
                               f"process ({_pids(self.path)}); wait for that dump-teacher to finish, then read it")
        return self

    def exclude(self) -> ReadersLock:
        """Take the lock exclusively as a writer about to delete or rewrite the store; refuse while anyone reads it."""
        if self._take(fcntl.LOCK_EX) is False:
            raise KdcacheError(f"{self.path.with_suffix('')} is being read by another kdcache process "
                               f"({_pids(self.path)}): it cannot be deleted or rewritten under it; wait for that "
                               f"process (distill, inspect, verify) to finish, or write elsewhere with another --out")
        return self

    def _take(self, kind: int) -> bool | None:
        """True when taken, False when refused, None when there is nothing to lock (a URL, a read-only folder)."""
        if self.path is None:
            return None
        try:
            self._fd = _flock(self.path, kind)
        except OSError:  # a folder this process cannot write: a reader there locks nothing, and no writer runs
            return None
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock; the last holder removes the file (others that opened it see it gone, and retry)."""
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when no one else holds it
            self.path.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        os.close(self._fd)
        self._fd = None


def _pids(path: Path) -> str:
    """'pid N, M' of the processes holding a flock on the file, from /proc/locks, or a plain word where unknown."""
    pids = _flock_holders(path)
    return ("pid " + ", ".join(map(str, pids))) if pids else "another process"
