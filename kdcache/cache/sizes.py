"""Sizes of cache bytes in words, for the statements that say what a cache or a view of it takes."""


def byte_size(size: float) -> str:
    """Bytes as GB, or MB below a gigabyte."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
