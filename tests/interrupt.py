"""Runs interrupted as a kill would: a helper the resume tests share."""

from collections.abc import Callable

import pytest


def interrupted_after_first_epoch(monkeypatch: pytest.MonkeyPatch, start: Callable[[], object]) -> None:
    """Call start() with every run stopping (KeyboardInterrupt) right after its first epoch is checkpointed."""
    from kdcache.stages.loop import Run

    end_epoch = Run.end_epoch

    def crash_after_first_epoch(self, metrics):
        end_epoch(self, metrics)
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "end_epoch", crash_after_first_epoch)
    try:
        with pytest.raises(KeyboardInterrupt):
            start()
    finally:
        monkeypatch.setattr(Run, "end_epoch", end_epoch)
