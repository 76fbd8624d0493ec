"""kdcache: run the teacher once, cache its multi-scale logits, train many students from the cache."""

import importlib.metadata

__version__ = importlib.metadata.version("kdcache")  # one source: pyproject.toml
