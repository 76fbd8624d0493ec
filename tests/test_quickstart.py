"""The README's main job, `kdcache quickstart`, run as a newcomer runs it."""

import csv
import re
import subprocess


def test_quickstart_trains_a_teacher_dumps_one_cache_and_distils_two_students(tmp_path):
    result = subprocess.run(["kdcache", "quickstart"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout[result.stdout.index("kdcache quickstart: digits"):]
    teacher = float(re.search(r"teacher resnet20\s+test accuracy ([\d.]+)%", table).group(1))
    ce = float(re.search(r"student resnet8, ce\s+test accuracy ([\d.]+)%", table).group(1))
    sdd_lskd = re.search(r"student resnet8, sdd-lskd\s+test accuracy ([\d.]+)% \(([+-][\d.]+) vs ce\)", table)
    assert teacher > 80 and ce > 50 and float(sdd_lskd.group(1)) > 50
    assert abs(float(sdd_lskd.group(1)) - ce - float(sdd_lskd.group(2))) < 0.011
    assert re.search(r"cache \(4 views\)\s+[\d.]+ MB", table)
    assert (tmp_path / "runs/quickstart/teacher/model.pt").exists()
    assert (tmp_path / "caches/quickstart-digits.zarr/zarr.json").exists()
    rows = list(csv.DictReader(open(tmp_path / "runs/quickstart/students/summary.csv")))
    assert [row["run"] for row in rows] == ["resnet8-ce", "resnet8-sdd-lskd"]
    assert (tmp_path / "runs/quickstart/students/summary.png").exists()
