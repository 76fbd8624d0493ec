"""One writer at a time: a lock file beside the cache, taken over when its owner is dead.

For a cache at a URL the lock is the object `<url>.lock` beside it, created exclusively where the
filesystem can (fsspec's "xb" mode: local files, memory://, and the object stores whose fsspec
backend implements it); elsewhere it is checked, then written, which two writers starting in the
same instant can both pass.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from kdcache.cache.location import Location, is_url, url_filesystem
from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)


def lock_path(cache_path: Location) -> str | Path:
    """The lock file of a cache: `<cache>.lock` beside it (for a URL, the URL of that object)."""
    if is_url(cache_path):
        return cache_path.rstrip("/") + ".lock"
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".lock")


class WriterLock:
    """An exclusive lock on a cache for one writing process."""

    def __init__(self, cache_path: Location) -> None:
        # a Path, or for a cache at a URL the lock's URL (then _fs and _fs_path reach it)
        self.path = lock_path(cache_path if is_url(cache_path) else Path(cache_path))
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        if isinstance(self.path, str):
            self._fs, self._fs_path = url_filesystem(self.path)

    def acquire(self) -> WriterLock:
        """Take the lock, or take over a stale one; refuse while another live process holds it."""
        if isinstance(self.path, str):
            return self._acquire_url()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({**self.owner, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._refuse_a_live_holder()
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}")
            partial.write_text(record)
            os.replace(partial, self.path)
            return self
        with os.fdopen(fd, "w") as file:
            file.write(record)
        return self

    def _acquire_url(self) -> WriterLock:
        """acquire() for a lock object at a URL: the same owner record and messages."""
        record = json.dumps({**self.owner, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
        try:
            self._create_exclusively(record)
        except FileExistsError:
            self._refuse_a_live_holder()
            self._fs.pipe_file(self._fs_path, record)  # one object written whole: no partial-then-rename needed
        return self

    def _refuse_a_live_holder(self) -> None:
        """The lock exists: refuse while its holder runs; otherwise say that its stale lock is taken over."""
        holder = self._holder()
        if holder is not None and _alive(holder):
            remote = isinstance(self.path, str)
            cache = self.path.removesuffix(".lock") if remote else self.path.with_suffix("")
            raise KdcacheError(
                f"{cache} is being written by another kdcache process (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish, or if that process is "
                f"gone, delete {'the lock object ' if remote else ''}{self.path}") from None
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
        """Drop the lock if this process still holds it."""
        try:
            holder = self._holder()
        except OSError as error:  # a lock at a URL that cannot be read now (network, credentials)
            log.warning("could not release the lock %s (%s); delete it if no kdcache process writes the cache",
                        self.path, error)
            return
        if holder is not None and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            if isinstance(self.path, str):
                try:
                    self._fs.rm(self._fs_path)
                except FileNotFoundError:
                    pass
                self._fs.invalidate_cache(self._fs_path)
            else:
                self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        if isinstance(self.path, str):
            # only absence reads as "no holder" here: a lock that cannot be reached is not taken over
            self._fs.invalidate_cache(self._fs_path)
            try:
                return json.loads(self._fs.cat_file(self._fs_path))
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                return None
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # unreadable or half-written: its writer died while taking it

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


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
