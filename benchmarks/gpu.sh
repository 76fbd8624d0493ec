#!/usr/bin/env bash
# benchmarks/gpu.sh: what a session lent a GPU runs first, in one command, in under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu.sh OUT_DIR              # on a CUDA machine: every step, JSON + log under OUT_DIR
#   bash benchmarks/gpu.sh --dry-run [OUT_DIR]  # anywhere, no GPU: check that every command parses, print the plan
#
# Steps, in this order, each timed and logged to OUT_DIR/gpu.log:
#   0   environment   python, torch, CUDA, NCCL, zarr and kdcache versions, the GPU; stops the script without CUDA
#   a   cuda tests    python -m pytest -m gpu (pyproject's `gpu` marker)            -> OUT_DIR/pytest-gpu.xml
#   b   benchmarks    benchmarks/run.py --device cuda, N = 50,000, batch 64 and 512; on CUDA run.py times
#                     every student step in fp32 and in bf16 + channels_last         -> OUT_DIR/run.json
#   c1-c5 torchrun smoke on digits: train-teacher --epochs 1; torchrun --nproc-per-node 1 dump-teacher; verify;
#                     torchrun --nproc-per-node 1 distill --cache; NCCL collectives (see c5 below)
#   d   projection    benchmarks/gpu_projection.py: 2 epochs timed of a CIFAR-100-shaped run (resnet32x4 ->
#                     resnet8x4, SDD-LSKD, batch 64) from the cache and from the live teacher, projected to 240
#                                                                                    -> OUT_DIR/projection.json
#   e1-e2 tokens      train-teacher --dataset text (the text quickstart's teacher, 6 epochs), then
#                     benchmarks/token_cache.py: its token dump timed against its pure forward  -> OUT_DIR/tokens.md
# and then OUT_DIR/gpu.json: every step's command, status, exit code, seconds and ceiling, the environment, the
# test counts and the projection; a short table is printed last. Caches, checkpoints and runs go to a temporary
# folder that is removed at the end (KEEP_WORK=1 keeps it), so OUT_DIR holds six files: the device tool brings
# back at most 8.
#
# Time: each command runs under `timeout` with its ceiling (the second column of the plan), and no command runs
# past GPU_SH_DEADLINE_S (default 465 s) after the start: a command that would is cut at the deadline, and the
# ones after it are skipped. The ceilings are limits, not measurements; the first GPU run's gpu.json records what
# each step took. The script exits 0 when every step passed, 1 when one failed, 2 on a usage error.
#
# c5: `torchrun --nproc-per-node 1 -m kdcache ...` starts no process group (kdcache joins one only when
# WORLD_SIZE > 1), so c2 and c4 check torchrun's environment on one GPU, and c5 joins NCCL by hand in one process
# and runs kdcache.distributed's all_sum, barrier and from_main through it.
#
# Through the device tool (/work/.library/device/README.md). Its image has Python 3.12, torch, torchvision, numpy,
# packaging, typing-extensions, pyyaml, fsspec, h5py, click, tqdm, scikit-learn, matplotlib, pytest and hypothesis
# (KINDS.md's list), but no zarr and nothing reaches a registry there, so zarr 3.1.6 and the packages of its
# needs that the image lacks (numcodecs, donfig, google-crc32c; read with `pip show` and `importlib.metadata
# .requires` here) travel as Python 3.12 wheels. .whl/ is already in .gitignore, so it travels only when named
# in carry (the README's `echo /.whl/ >> .git/info/exclude` is not needed).
#   1. Here, in the repository root, once per session (about 13 MB of wheels):
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#            zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 tokenizers==0.23.3
#        bash benchmarks/gpu.sh --dry-run          # every command parses here
#   2. The tool's `run`, with carry [".whl"] and timeout_s 540 (the script's 465 s, the installs, and slack):
#        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 -m pip install -q --no-index --no-deps
#        --no-build-isolation -e . || exit; bash benchmarks/gpu.sh "$OUT"
#      (one line; --no-build-isolation because setuptools cannot be fetched there, the image's is used; keep
#      one version of each package in .whl/, since two stop the install).
#   3. The reply's files_at holds gpu.json, gpu.log, run.json, projection.json, tokens.md and pytest-gpu.xml; its
#      output_tail ends with the table. Then give_back, unless you rerun at once.

set -euo pipefail

usage() {
    echo "usage: bash benchmarks/gpu.sh OUT_DIR | bash benchmarks/gpu.sh --dry-run [OUT_DIR]"
}

dry_run=0
out_dir=""
while (($# > 0)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n $out_dir ]]; then echo "gpu.sh: one OUT_DIR only" >&2; usage >&2; exit 2; fi
            out_dir=$1
            ;;
    esac
    shift
done
if [[ -z $out_dir ]]; then
    if ((!dry_run)); then echo "gpu.sh: OUT_DIR is missing" >&2; usage >&2; exit 2; fi
    out_dir=OUT_DIR  # a placeholder: a dry run writes nothing there
else
    out_dir=$(realpath -m -- "$out_dir")
fi

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEADLINE_S=${GPU_SH_DEADLINE_S:-465}
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1)  # what the `torchrun` script runs
export PYTHONUNBUFFERED=1
work=$(mktemp -d "${TMPDIR:-/tmp}/kdcache-gpu.XXXXXX")  # scratch: the Python snippets, caches, checkpoints, runs
if ((dry_run)) || [[ ${KEEP_WORK:-0} != 1 ]]; then trap 'rm -rf -- "$work"' EXIT; fi
smoke=$work/smoke

# step 0: what the figures come from; fails without CUDA or without zarr (the wheels were not installed)
cat >"$work/environment.py" <<'PYTHON'
import json, platform, sys
from pathlib import Path
import google_crc32c, numcodecs, torch, zarr
import kdcache
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "kdcache": kdcache.__version__,
        "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    properties = torch.cuda.get_device_properties(0)
    info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                capability=f"{properties.major}.{properties.minor}", gpus=torch.cuda.device_count(),
                nccl=".".join(map(str, torch.cuda.nccl.version())))
print(json.dumps(info))
Path(sys.argv[1]).write_text(json.dumps(info, indent=2) + "\n")
sys.exit(0 if info["cuda_available"] else "gpu.sh: torch sees no CUDA device (on the CPU, use --dry-run)")
PYTHON

# step c5: NCCL in one process, through kdcache's own collectives
cat >"$work/nccl_check.py" <<'PYTHON'
import torch
import torch.distributed as dist
from kdcache import distributed
from kdcache.runtime import pick_device
device = pick_device("cuda")
here = distributed.world()
dist.init_process_group("nccl", rank=here.rank, world_size=here.size, device_id=device)
total = int(distributed.all_sum(torch.tensor([here.rank + 1]))[0])
distributed.barrier()
result = distributed.from_main(lambda: "rank 0 ran it")
print(f"backend {dist.get_backend()}, world {dist.get_world_size()}, all_sum {total}, from_main {result!r}")
assert dist.get_backend() == "nccl" and total == here.size * (here.size + 1) // 2
assert result == "rank 0 ran it" or not here.is_main
dist.destroy_process_group()
PYTHON

# the plan: name, ceiling in seconds, the step it needs ("-": none), the command
names=()
ceilings=()
needs=()
commands=()
quote() {  # the words as bash reads them back: plain words as they are, others through printf %q
    local word quoted=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:,=+@%-]+$ ]]; then quoted+=("$word"); else quoted+=("$(printf '%q' "$word")"); fi
    done
    echo "${quoted[*]}"
}
step() {
    names+=("$1")
    ceilings+=("$2")
    needs+=("$3")
    commands+=("$(quote "${@:4}")")
}
step 0-environment 30 - "$PY" "$work/environment.py" "$work/environment.json"
step a-cuda-tests 60 - "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --junitxml "$out_dir/pytest-gpu.xml" tests
step b-benchmarks 210 - "$PY" benchmarks/run.py --device cuda --samples 50000 --batch-sizes 64,512 \
    --step-images 4096 --repeats 5 --epoch-repeats 2 --dump-repeats 2 --store-repeats 5 --json "$out_dir/run.json"
step c1-smoke-teacher 45 - "$PY" -m kdcache train-teacher --dataset digits --model resnet20 --epochs 1 \
    --device cuda --out "$smoke/teacher"
step c2-smoke-dump 45 c1-smoke-teacher "${TORCHRUN[@]}" -m kdcache dump-teacher \
    --checkpoint "$smoke/teacher/model.pt" --dataset digits --views 2 --device cuda --out "$smoke/cache.zarr"
step c3-smoke-verify 30 c2-smoke-dump "$PY" -m kdcache verify "$smoke/cache.zarr"
step c4-smoke-distill 45 c2-smoke-dump "${TORCHRUN[@]}" -m kdcache distill --cache "$smoke/cache.zarr" \
    --student resnet8 --loss sdd-lskd --epochs 2 --device cuda --out "$smoke/distill"
step c5-smoke-nccl 30 - "${TORCHRUN[@]}" "$work/nccl_check.py"
step d-projection 150 - "$PY" benchmarks/gpu_projection.py --device cuda --work "$work/projection" \
    --json "$out_dir/projection.json"
step e1-text-teacher 60 - "$PY" -m kdcache train-teacher --dataset text --model gpt:layers=4,width=256,heads=4 \
    --epochs 6 --optimizer adamw --lr 3e-3 --weight-decay 0.1 --schedule cosine --lr-warmup-epochs 0.5 \
    --clip-grad 1 --batch-size 32 --device cuda --out "$smoke/text-teacher"
step e2-token-dump 60 e1-text-teacher "$PY" benchmarks/token_cache.py --teacher "$smoke/text-teacher" \
    --sequences 64 --rows 36:q6 --dump-repeats 5 --device cuda --out "$out_dir/tokens.md"

print_plan() {
    local i
    echo "gpu.sh plan: ${#names[@]} commands, none past ${DEADLINE_S} s; OUT_DIR $out_dir; scratch $work"
    for i in "${!names[@]}"; do
        printf '%-18s ceiling %3s s  needs %-16s\n    %s\n' "${names[i]}" "${ceilings[i]}" "${needs[i]}" "${commands[i]}"
    done
}

# --dry-run: every command parsed by the parser it will meet (click, argparse, torchrun's), nothing run
CHECK_PY=$(cat <<'PYTHON'
import importlib.util, sys, tomllib
from pathlib import Path
import click, torch
from torch.distributed import run as torchrun
from kdcache.cli import cli

PY = sys.argv[2]

def load(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_checked", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def check_pytest(args):
    import pytest  # noqa: F401
    markers = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(marker.startswith("gpu:") for marker in markers), "pyproject registers no gpu marker"
    assert args[args.index("-m") + 1] == "gpu" and Path(args[-1]).is_dir()
    return "pytest: importable, the gpu marker is registered"

def check_kdcache(args):
    name, *rest = args
    command = cli.get_command(click.Context(cli), name)
    assert command is not None, f"kdcache has no command {name}"
    command.make_context(name, list(rest))
    return f"kdcache {name}: parses"

def check_torchrun(args):
    parsed = torchrun.get_args_parser().parse_args(args)
    assert parsed.standalone and parsed.nproc_per_node == "1", "expected --standalone --nproc-per-node 1"
    inner = [PY, "-m", parsed.training_script] if parsed.module else [PY, parsed.training_script]
    return "torchrun --standalone --nproc-per-node 1, then " + check(inner + parsed.training_script_args)

def check_run(args):
    bench = load("benchmarks/run.py")
    plan = bench.make_plan(bench.parse_args(args), torch.device("cuda"))
    return (f"benchmarks/run.py: parses; on CUDA: N {plan.samples}, batch sizes {plan.batch_sizes}, precisions "
            f"{plan.precisions}, {plan.step_images} images x {plan.repeats} repeats per step variant")

def check_projection(args):
    parsed = load("benchmarks/gpu_projection.py").parse_args(args)
    return (f"benchmarks/gpu_projection.py: parses; {parsed.samples} train / {parsed.test_samples} test images, "
            f"{parsed.views} views, {parsed.epochs} epochs timed per source, projected to {parsed.projected_epochs}")

def check_tokens(args):
    parsed = load("benchmarks/token_cache.py").parse_args(args)
    return (f"benchmarks/token_cache.py: parses; the teacher's first {parsed.sequences} sequences, the dump timed "
            f"{parsed.dump_repeats} times on {parsed.device}")

def check(argv):
    assert argv[0] == PY, f"expected {PY}, found {argv[0]}"
    rest = argv[1:]
    if rest[0].endswith(".py") and Path(rest[0]).parent != Path("benchmarks"):  # a snippet of this script
        compile(Path(rest[0]).read_text(), rest[0], "exec")
        return f"{Path(rest[0]).name}: compiles"
    checks = {"pytest": check_pytest, "kdcache": check_kdcache, "torch.distributed.run": check_torchrun}
    if rest[0] == "-m" and rest[1] in checks:
        return checks[rest[1]](rest[2:])
    scripts = {"benchmarks/run.py": check_run, "benchmarks/gpu_projection.py": check_projection,
               "benchmarks/token_cache.py": check_tokens}
    return scripts[rest[0]](rest[1:])

failed = 0
for line in Path(sys.argv[1]).read_text().splitlines():
    name, *argv = line.split("\0")
    try:
        print(f"{name:<18} ok: {check(argv)}")
    except (Exception, SystemExit) as error:  # argparse exits on a bad flag
        failed += 1
        print(f"{name:<18} FAILED: {type(error).__name__}: {error}")
sys.exit(f"gpu.sh --dry-run: {failed} command(s) do not parse" if failed else 0)
PYTHON
)

if ((dry_run)); then
    print_plan
    for i in "${!names[@]}"; do  # one line per command: its name and its words, NUL-separated
        eval "argv=(${commands[i]})"
        printf '%s' "${names[i]}"
        printf '\0%s' "${argv[@]}"
        printf '\n'
    done >"$work/plan"
    echo "checking that every command parses (nothing runs):"
    "$PY" -c "$CHECK_PY" "$work/plan" "$PY"
    echo "gpu.sh --dry-run: all ${#names[@]} commands parse; run \`bash benchmarks/gpu.sh OUT_DIR\` on a GPU"
    exit 0
fi

# -- the run -----------------------------------------------------------------------------------------------
mkdir -p -- "$out_dir"
log=$out_dir/gpu.log
steps_tsv=$work/steps.tsv
: >"$log"
: >"$steps_tsv"
started=$(date +%s.%N)
elapsed() { awk -v now="$(date +%s.%N)" -v since="$1" 'BEGIN { printf "%.1f", now - since }'; }
print_plan | tee -a "$log"

status_of() {  # the status a step ended with (nothing before it ran)
    awk -F '\t' -v name="$1" '$1 == name { print $2 }' "$steps_tsv"
}

run_step() {  # run_step INDEX: one command, timed, cut at its ceiling or at the deadline, logged
    local i=$1 name=${names[$1]} rc=0 status left limit offset since seconds
    local -a argv
    # what is left before the deadline, less the 5 s that `timeout --kill-after` may add
    left=$(awk -v d="$DEADLINE_S" -v e="$(elapsed "$started")" 'BEGIN { printf "%d", d - e - 5 }')
    limit=${ceilings[i]}
    if ((left < limit)); then limit=$left; fi
    if [[ ${needs[i]} != - && $(status_of "${needs[i]}") != ok ]]; then
        status="skipped: ${needs[i]} did not pass"
    elif ((limit < 5)); then
        status="skipped: the ${DEADLINE_S} s deadline"
    fi
    if [[ -n ${status:-} ]]; then
        printf '%s\t%s\t\t\t%s\t%s\n' "$name" "$status" "${ceilings[i]}" "${commands[i]}" >>"$steps_tsv"
        echo "== $name: $status" | tee -a "$log"
        return
    fi
    eval "argv=(${commands[i]})"
    offset=$(stat -c %s "$log")
    printf '\n== %s  (ceiling %s s, limit %s s)  %s\n$ %s\n' "$name" "${ceilings[i]}" "$limit" \
        "$(date -u '+%H:%M:%S UTC')" "${commands[i]}" >>"$log"
    echo "== $name (limit $limit s) ..."
    since=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "${argv[@]}" >>"$log" 2>&1 || rc=$?
    seconds=$(elapsed "$since")
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "${ceilings[i]}" "${commands[i]}" >>"$steps_tsv"
    echo "== $name: $status (exit $rc) in $seconds s" | tee -a "$log"
    if [[ $status != ok ]]; then tail -c +"$((offset + 1))" "$log" | tail -n 40; fi
}

for i in "${!names[@]}"; do
    run_step "$i"
    if ((i == 0)) && [[ $(status_of "${names[0]}") != ok ]]; then
        echo "gpu.sh: the environment step failed (no CUDA, or zarr or kdcache not installed: see the top of this" \
            "script); nothing else was run" | tee -a "$log"
        break
    fi
done

SUMMARY_PY=$(cat <<'PYTHON'
import json, sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

steps_tsv, work, out, deadline, seconds = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]

def read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None

steps = []
for line in steps_tsv.read_text().splitlines():
    name, status, rc, taken, ceiling, command = line.split("\t")
    steps.append({"name": name, "status": status, "exit": int(rc) if rc else None,
                  "seconds": float(taken) if taken else None, "ceiling_s": int(ceiling), "command": command})
tests = None
if (out / "pytest-gpu.xml").is_file():
    suite = ElementTree.parse(out / "pytest-gpu.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
projection = (read_json(out / "projection.json") or {}).get("projection")
document = {"script": "benchmarks/gpu.sh", "seconds": float(seconds), "deadline_s": int(deadline),
            "passed": all(step["status"] == "ok" for step in steps) and len(steps) > 1,
            "environment": read_json(work / "environment.json"), "steps": steps, "cuda_tests": tests,
            "projection": projection}
document["files"] = sorted({path.name for path in out.iterdir() if path.is_file()} | {"gpu.json"})
(out / "gpu.json").write_text(json.dumps(document, indent=2) + "\n")

print(f"\ngpu.sh: {'every step passed' if document['passed'] else 'NOT every step passed'}, {seconds} s "
      f"(deadline {deadline} s); {(document['environment'] or {}).get('gpu', 'no GPU')}")
print(f"{'step':<18}{'status':<10}{'exit':>5}{'seconds':>9}{'ceiling':>9}")
for step in steps:
    status, _, reason = step["status"].partition(": ")
    print(f"{step['name']:<18}{status:<10}{step['exit'] if step['exit'] is not None else '':>5}"
          f"{step['seconds'] if step['seconds'] is not None else '':>9}{step['ceiling_s']:>9}  {reason}")
if tests:
    look = " (skipped with CUDA present: see gpu.log)" if tests["skipped"] and (document["environment"] or {}).get(
        "cuda_available") else ""
    print(f"cuda tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
          f"{tests['skipped']} skipped{look}")
for row in [row for section in (read_json(out / "run.json") or {}).get("sections", []) for row in section["rows"]
            if row["ratio"] is not None]:
    target = f">= {row['target']:g} {'met' if row['met'] else 'MISSED'}" if row["target"] is not None else ""
    print(f"run.py  {row['what']:<48}{row['ratio']:>8.3f}  {target}")
if projection:
    print(f"projection, {projection['epochs']} epochs: cache {projection['cache_seconds']:.0f} s, live teacher "
          f"{projection['live_seconds']:.0f} s, live/cache {projection['live_over_cache']:.3f}; with the dump of "
          f"16 views: live/cache {projection['live_over_cache_with_dump_16_views']:.3f}")
print(f"files in {out}: {', '.join(document['files'])}")
PYTHON
)

total=$(elapsed "$started")
"$PY" -c "$SUMMARY_PY" "$steps_tsv" "$work" "$out_dir" "$DEADLINE_S" "$total" | tee -a "$log"
if grep -qv $'\tok\t' "$steps_tsv" || (($(wc -l <"$steps_tsv") < ${#names[@]})); then exit 1; fi
exit 0
