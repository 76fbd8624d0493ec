"""benchmarks/run.py runs and prints its whole table; its figures are never asserted (benchmarks are not tests)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (16, 32)  # small, so that the test takes seconds; `--quick` alone uses 64 and 512
RATIO_ROWS = {
    "student step": [f"b{batch} fp32 {what}" for batch in BATCHES
                     for what in ("cache/CE kd", "cache/CE dkd", "cache/CE sdd-lskd", "cache/live sdd-lskd",
                                  "CE/live (ceiling of cache/live)")],
    "epoch": ["Dataset time / device time"],
    "dump": ["dump/inference zarr", "dump/inference hdf5"],
    "store": ["read zarr/raw", "read hdf5/raw", "write zarr/raw", "write hdf5/raw"],
}
NUMBER = r"[0-9][0-9,]*\.[0-9]+"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", "cpu", "--quick", "--samples", "512",
               "--batch-sizes", ",".join(map(str, BATCHES)), "--step-images", "1", "--epoch-samples", "64",
               "--dump-samples", "64", "--store-samples", "512",
               "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_prints_every_section_and_ratio_with_numbers(quick_run):
    stdout, _ = quick_run
    for section, ratios in RATIO_ROWS.items():
        block = stdout.split(f"== {section} ==  (", 1)
        assert len(block) == 2, f"section {section!r} missing from:\n{stdout}"
        body = block[1].split("\n== ", 1)[0]
        assert re.search(rf"{NUMBER} (img/s|MB/s|s)\b", body), f"{section}: no measurement in\n{body}"
        for what in ratios:
            line = next((line for line in body.splitlines() if line.startswith(what + " ")), None)
            assert line is not None, f"{section}: no row {what!r} in\n{body}"
            assert re.search(rf"\s{NUMBER}\b", line[len(what):]), f"{section}: row {what!r} has no ratio: {line!r}"


@pytest.mark.slow
def test_quick_run_writes_figures_settings_and_targets_as_json(quick_run):
    _, document = quick_run
    assert [section["name"] for section in document["sections"]] == list(RATIO_ROWS)
    assert {"python", "torch", "zarr", "h5py", "numpy"} <= set(document["versions"])
    assert document["cores"] >= 1 and document["torch_threads"] >= 1 and document["plan"]["samples"] == 512
    for section in document["sections"]:
        rows = {row["what"]: row for row in section["rows"]}
        for what in RATIO_ROWS[section["name"]]:
            assert math.isfinite(rows[what]["ratio"]) and rows[what]["ratio"] > 0
        for row in section["rows"]:
            assert (row["value"] is None) != (row["ratio"] is None)
            assert row["met"] is None if row["target"] is None else isinstance(row["met"], bool)
    targets = {row["what"]: row["target"] for section in document["sections"] for row in section["rows"]}
    assert targets["b16 fp32 cache/CE sdd-lskd"] == 0.9 and targets["dump/inference zarr"] == 0.85
    assert targets["read zarr/raw"] == 0.5 and targets["b16 fp32 cache/live sdd-lskd"] is None  # 2.3 is at b64
