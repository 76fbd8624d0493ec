"""One writer at a time: a lock file beside the cache, taken over when its owner is dead."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)


def lock_path(cache_path: Path) -> Path:
    """The lock file of a cache: `<cache>.lock` beside it."""
    return cache_path.with_name(cache_path.name + ".lock")


class WriterLock:
    """An exclusive lock on a cache for one writing process."""

    def __init__(self, cache_path: Path) -> None:
        self.path = lock_path(Path(cache_path))
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def acquire(self) -> WriterLock:
        """Take the lock, or take over a stale one; refuse while another live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({**self.owner, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and _alive(holder):
                raise KdcacheError(
                    f"{self.path.with_suffix('')} is being written by another kdcache process (pid "
                    f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}); wait for it to "
                    f"finish, or if that process is gone, delete {self.path}") from None
            log.warning("taking over the stale lock %s of a process that no longer runs (%s)", self.path, holder)
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}")
            partial.write_text(record)
            os.replace(partial, self.path)
            return self
        with os.fdopen(fd, "w") as file:
            file.write(record)
        return self

    def release(self) -> None:
        """Drop the lock if this process still holds it."""
        holder = self._holder()
        if holder is not None and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
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
