"""One registry of names, timm style, for models, datasets, augmentation policies, losses and store backends.

An entry is a callable registered under its function name (or a name given explicitly, for names that
are not identifiers such as `kd+ls`); `get(name, **kw)` calls it. A duplicate name is refused, and an
unknown name is one line listing the known ones. A registry whose entries come from a file (the losses of
configs/losses.yaml) is given a `fill` that registers them on first use, so the file is read only when asked.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdcache.errors import unknown_name

T = TypeVar("T")
Entry = TypeVar("Entry", bound=Callable)


class Registry(Generic[T]):
    """Names mapped to the callables that make a T."""

    def __init__(self, call: str, sort: bool = True, fill: Callable[[Registry[T]], None] | None = None) -> None:
        """call: how errors name the lookup (`create_model()`); sort: list names sorted, else in registration order;
        fill: registers further entries the first time the registry is read."""
        self.call, self.sort, self._fill = call, sort, fill
        self._entries: dict[str, Callable[..., T]] = {}

    def _filled(self) -> dict[str, Callable[..., T]]:
        """The entries, once `fill` has registered its own."""
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)
        return self._entries

    def register(self, entry: Entry, name: str | None = None) -> Entry:
        """Register `entry` under `name` or its function name; returns it unchanged, so it works as a decorator."""
        name = name or entry.__name__
        if name in self._entries:
            raise ValueError(f"{self.call}: {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def entry(self, name: str) -> Callable[..., T]:
        """The callable registered as `name`; an unknown name is a KdcacheError listing the known ones."""
        try:
            return self._filled()[name]
        except KeyError:
            raise unknown_name(self.call, name, self.names()) from None

    def get(self, name: str, **kwargs: object) -> T:
        """What the entry `name` makes from `kwargs`."""
        return self.entry(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        """The registered names matching a shell-style pattern."""
        found = [name for name in self._filled() if fnmatch.fnmatchcase(name, pattern)]
        return sorted(found) if self.sort else found

    def __contains__(self, name: object) -> bool:
        return name in self._filled()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
