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


def missing_root(dataset: str, folder: str) -> KdcacheError:
    """The error for a dataset named without its folder, in the words of the command line and of the Python API both
    (the same loader serves `--data-root` and `load_dataset(root=...)`)."""
    return KdcacheError(f"dataset {dataset!r} needs its folder: --data-root DIR on the command line, root=DIR in "
                        f"load_dataset(); {folder}")
