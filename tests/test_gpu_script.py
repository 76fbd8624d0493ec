"""benchmarks/gpu.sh without a GPU: --dry-run checks that every command it would run parses and prints them; a run
without one OUT_DIR is a usage error."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "benchmarks/gpu.sh"
TORCHRUN = "-m torch.distributed.run --standalone --nproc-per-node 1"
# each step's command as the plan prints it (the part that does not depend on OUT_DIR or the scratch folder)
STEPS = {
    "a-cuda-tests": "-m pytest -q -p no:cacheprovider -m gpu -rs --junitxml OUT_DIR/pytest-gpu.xml tests",
    "b-benchmarks": "benchmarks/run.py --device cuda --samples 50000 --batch-sizes 64,512 ",
    "c1-smoke-teacher": "-m kdcache train-teacher --dataset digits --model resnet20 --epochs 1 --device cuda",
    "c2-smoke-dump": f"{TORCHRUN} -m kdcache dump-teacher --checkpoint ",
    "c3-smoke-verify": "-m kdcache verify ",
    "c4-smoke-distill": f"{TORCHRUN} -m kdcache distill --cache ",
    "c5-smoke-nccl": f"{TORCHRUN} ",
    "d-projection": "benchmarks/gpu_projection.py --device cuda --work ",
    "e1-text-teacher": "-m kdcache train-teacher --dataset text --model gpt:layers=4,width=256,heads=4",
    "e2-token-dump": "benchmarks/token_cache.py --teacher ",
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(*args: str) -> subprocess.CompletedProcess:
    """bash benchmarks/gpu.sh ARGS from the repository root."""
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dry_run_checks_and_prints_every_step() -> None:
    """--dry-run exits 0 after checking every command, and its plan prints each step's command."""
    result = run_script("--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name, command in STEPS.items():
        line = next((line for line in out.splitlines() if command in line), None)
        assert line is not None, f"{name}: no command with {command!r} in the plan:\n{out}"
        assert f"{name:<18} ok: " in out, f"{name} was not checked:\n{out}"
    assert "precisions ('fp32', 'bf16+cl')" in out  # run.py's own plan on CUDA: both precisions
    assert "--json OUT_DIR/projection.json" in out and "--json OUT_DIR/run.json" in out
    assert "--device cuda --out OUT_DIR/tokens.md" in out
    assert f"all {len(STEPS) + 1} commands parse" in out  # and the environment step
    assert not (ROOT / "OUT_DIR").exists()  # the placeholder: a dry run writes no output


@pytest.mark.parametrize("args", [(), ("--no-such-flag", "out"), ("one", "two")])
def test_a_run_without_one_out_dir_is_a_usage_error(args: tuple[str, ...]) -> None:
    """No OUT_DIR, an unknown flag or two folders: exit 2 and the usage line, before anything runs."""
    result = run_script(*args)
    assert result.returncode == 2
    assert "usage: bash benchmarks/gpu.sh OUT_DIR" in result.stderr
    assert result.stdout == ""
