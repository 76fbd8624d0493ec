"""benchmarks/fidelity.py --quick runs every method and writes consistent results; its accuracies are never judged."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ce", "online", "cache_k1", "cache_k2", "cache_exhaustive"]


@pytest.mark.slow
def test_quick_run_writes_every_method_per_seed_with_consistent_aggregates_and_a_png(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--quick", "--device", "cpu",
               "--out", str(tmp_path / "fidelity")]
    # one thread: on cores shared with other jobs, two spin-waiting threads made the run several times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "fidelity"
    report = json.loads((out / "fidelity.json").read_text())

    assert list(report["methods"]) == METHODS
    assert report["caches"]["cache_exhaustive"]["views"] == 162  # every crop+flip view of the cifar policy
    for name, method in report["methods"].items():
        runs = method["runs"]
        assert [run["seed"] for run in runs] == [0, 1], name
        for run in runs:
            assert 0 <= run["last"] <= 1 and 0 <= run["best"] <= 1, (name, run)
            assert run["best"] >= run["last"] and run["best"] == max(run["curve"]), (name, run)
            assert run["curve"][run["best_epoch"] - 1] == run["best"] and run["seconds"] > 0, (name, run)
        for key in ("last", "best", "best_epoch", "seconds"):
            values = [run[key] for run in runs]
            assert method[f"{key}_mean"] == pytest.approx(statistics.fmean(values)), (name, key)
            assert method[f"{key}_std"] == pytest.approx(statistics.stdev(values)), (name, key)
        if name != "online":  # paired by seed with the online run
            for key in ("last", "best"):
                differences = [run[key] - base[key] for run, base in zip(runs, report["methods"]["online"]["runs"])]
                assert method["vs_online"][f"{key}_mean"] == pytest.approx(statistics.fmean(differences)), (name, key)
                assert method["vs_online"][f"{key}_std"] == pytest.approx(statistics.stdev(differences)), (name, key)
    png = (out / "fidelity.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "cache_exhaustive" in result.stdout and "last epoch" in result.stdout
