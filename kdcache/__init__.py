"""kdcache: run the teacher once, cache its multi-scale logits, train many students from the cache."""

__version__ = "0.1.0"
