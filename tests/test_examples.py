"""examples/ run as a user runs them (subprocesses, one epoch each, side by side) on a digits cache."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(path.name for path in (ROOT / "examples").glob("*.py"))


def test_there_are_the_four_examples():
    assert EXAMPLES == ["ddp_loop.py", "plain_loop.py", "regions_loop.py", "timm_student.py"]
    assert len((ROOT / "examples" / "plain_loop.py").read_text().splitlines()) <= 60


@pytest.mark.slow
def test_every_example_runs_and_reports_its_accuracy(digits_cache):
    # started together: most of each run is importing torch, which two cores do side by side
    options = {"timm_student.py": ["--student", "timm:test_efficientnet"]}  # timm's smallest: the loop is the test
    runs = {example: subprocess.Popen([sys.executable, str(ROOT / "examples" / example), "--cache",
                                       str(digits_cache), "--epochs", "1", *options.get(example, [])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})  # three on two cores
            for example in EXAMPLES}
    for example, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{example}: {err}"
        found = re.fullmatch(r"epoch 1: loss [0-9.]+, test accuracy ([0-9.]+)\n", out)
        assert found, f"{example}: {out}"
        assert 0.0 <= float(found.group(1)) <= 1.0
