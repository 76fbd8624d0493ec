"""examples/ run as a user runs them (subprocesses, one epoch each) on a digits cache, and learn something."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_api import digits_cache  # noqa: F401  (the module's cache fixture)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(path.name for path in (ROOT / "examples").glob("*.py"))


def test_there_are_the_three_examples():
    assert EXAMPLES == ["plain_loop.py", "regions_loop.py", "timm_student.py"]
    assert len((ROOT / "examples" / "plain_loop.py").read_text().splitlines()) <= 60


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_an_example_runs_and_reports_its_accuracy(example, digits_cache):  # noqa: F811
    result = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--cache", str(digits_cache),
                             "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    found = re.fullmatch(r"epoch 1: loss [0-9.]+, test accuracy ([0-9.]+)\n", result.stdout)
    assert found, result.stdout
    assert 0.0 <= float(found.group(1)) <= 1.0
