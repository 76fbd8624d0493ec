"""User-facing errors: the CLI prints the message on one line and exits with `exit_code`."""

from collections.abc import Iterable


class KdcacheError(Exception):
    """A mistake in the user's input or environment; the message says what was expected, what was found, what to do."""

    exit_code = 2


class CorruptCacheError(KdcacheError):
    """A cache whose bytes fail a check (checksum, missing chunk, non-finite values)."""

    exit_code = 1


def unknown_name(call: str, name: str, known: Iterable[str]) -> KdcacheError:
    """The error for a name that is not registered, listing the registered ones."""
    return KdcacheError(f"{call}: unknown name {name!r}; known: {', '.join(sorted(known))}")
