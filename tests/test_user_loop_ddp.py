"""examples/ddp_loop.py, the user's own loop on kdcache's public API, under torchrun: 2 processes, gloo on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_loop.py"


@pytest.mark.slow
def test_the_ddp_loop_learns_under_torchrun_with_two_processes_and_ends_cleanly(digits_cache, tmp_path):
    # the fixture's teacher is random: the labels' term of kd is what the student learns from here
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(EXAMPLE), "--cache", str(digits_cache), "--epochs", "3", "--loss", "kd"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()  # the first process speaks for the run: one line an epoch
    assert [re.fullmatch(r"epoch (\d): loss [0-9.]+, test accuracy [0-9.]+", line).group(1) for line in lines] == [
        "1", "2", "3"]
    assert float(lines[-1].rsplit(" ", 1)[1]) >= 0.3  # 10 classes: chance is 0.1
    assert "Traceback" not in done.stderr and "destroy_process_group" not in done.stderr  # the group ends cleanly
