#!/usr/bin/env bash
# The GPU run: every check that needs a GPU, on one GPU in under 8 minutes, as one Markdown table.
#
#   bash bench/gpu.sh [--out FILE]      # on a GPU machine; the table goes to stdout and FILE (default bench/out/gpu.md)
#   bash bench/gpu.sh --smoke [--out F] # the same steps at toy scale on the CPU, under 3 minutes (CI runs it)
#
# Steps (each under `timeout`; a failing step is a row of the table and the script goes on; the exit
# status is 1 when any step failed):
#   inputs      the MNIST test file throughput.py reads, in a temporary $DFKD_BENCH_OUT
#   cuda tests  python -m pytest -q tests/test_cuda.py (--smoke: all skipped without a GPU, reported)
#   throughput  bench/throughput.py --suite mnist --recipes dfad, fp32 then bf16 (20 s per loop; --smoke 5 s)
#   teacher     bench/train_teacher.py: CIFAR-10 resnet20, 10 epochs on cuda (--smoke: MNIST LeNet-5, 1 epoch)
#   gap         bench/gap.py with that teacher, --budgets 75s on cuda (--smoke: gap.py --smoke)
# Runs from any folder (it works in the repository root) with the active environment's python.
set -euo pipefail

smoke=0
out=bench/out/gpu.md
while (($#)); do
  case $1 in
    --smoke) smoke=1 ;;
    --out) out=${2:?--out needs a file}; out=$(realpath -m -- "$out"); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; use --smoke and/or --out FILE" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ((smoke)); then
  device=cpu tput_budget=5s gap_args=(--smoke)
  teacher_args=(--dataset mnist --arch lenet5 --epochs 1 --lr 0.05 --device cpu)
  step_limit=120
else
  device=cuda tput_budget=20s gap_args=(--budgets 75s --suite cifar10 --eval-images 10000)
  teacher_args=(--dataset cifar10 --arch resnet20 --epochs 10 --crop-pad 4 --flip --device cuda)
  step_limit=330
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DFKD_BENCH_OUT=$work/cache  # teachers and eval files of the bench scripts: never the repository's
mkdir -p "$DFKD_BENCH_OUT" "$work/logs"
rows=()
failed=0

# run_step NAME LIMIT_S COMMAND...: runs it with its output in a log; sets step_rc and step_s.
run_step() {
  local name=$1 limit=$2 started
  shift 2
  started=$(date +%s%N)
  step_rc=0
  timeout "$limit" "$@" >"$work/logs/$name.log" 2>&1 || step_rc=$?
  step_s=$(( ($(date +%s%N) - started) / 100000000 ))
  step_s="$((step_s / 10)).$((step_s % 10))"
  if ((step_rc != 0)); then
    echo "gpu.sh: step '$name' failed (exit $step_rc); the end of its log:" >&2
    tail -n 5 "$work/logs/$name.log" >&2
  fi
}

# add_row STEP DETAIL: a table row from the last run_step (a failing step says why in its detail).
add_row() {
  local result=ok detail=$2
  if ((step_rc == 124)); then
    result=FAILED detail="timed out after ${step_limit} s"; failed=1
  elif ((step_rc != 0)); then
    result=FAILED detail="exit $step_rc: $(tail -n 1 "$work/logs/$1.log" | cut -c1-200)"; failed=1
  fi
  rows+=("| $1 | $result | $step_s | ${detail//|/\\|} |")
}

# summary KIND FILE: one line of numbers from a step's output (python, so that JSON is read properly).
summary() {
  python - "$@" <<'PY' 2>/dev/null || echo "(no summary)"
import json, re, sys
kind, path = sys.argv[1], sys.argv[2]
if kind == "pytest":
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", open(path).read())
    print(", ".join(f"{n} {what}" for n, what in counts) or "no tests ran")
elif kind == "throughput":
    rows = json.load(open(path))["suites"][0]["rows"]
    ours = next(r for r in rows if r["loop"] == "dfkd")
    ratio = next(r for r in rows if r["loop"] == "dfkd / reference")
    print(f"dfkd {ours['total samples/s']:,.0f} total samples/s, {ratio['total samples/s']} the reference; "
          f"agreement {100 * ours['agreement (real)']:.1f}%")
elif kind == "teacher":
    print(re.findall(r"epoch .*", open(path).read())[-1])
elif kind == "gap":
    r = json.load(open(path))["rows"][0]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"
    ratio = "-" if r["agreement default / KD"] is None else f"{r['agreement default / KD']:.3f}x"
    print(f"{r['budget']}: default path ({r['default recipe']}) agreement {pct(r['default agreement'])}, acc "
          f"{pct(r['default acc'])}; KD agreement {pct(r['KD agreement'])}, acc {pct(r['KD acc'])}; ratio {ratio}"
          + (f"; {r['note']}" if r["note"] else ""))
PY
}

run_step inputs "$step_limit" python - <<'PY'
import dataclasses, sys
sys.path.insert(0, "bench")
from run_bench import ensure_inputs
from suites import make_suite
ensure_inputs(dataclasses.replace(make_suite("mnist-lenet"), prior=None))  # the bundled teacher; its test file
PY
add_row inputs "MNIST test file for throughput.py"

run_step "cuda tests" "$step_limit" python -m pytest -q -n 0 -p no:cacheprovider tests/test_cuda.py
detail=$(summary pytest "$work/logs/cuda tests.log")
if ((step_rc == 0)) && ! grep -q passed <<<"$detail"; then
  if ((smoke)); then detail="$detail (no CUDA device: all skipped, as expected on a CPU)"
  else step_rc=1; detail="$detail: none passed, is the GPU visible?"; echo "gpu.sh: $detail" >&2; fi
fi
add_row "cuda tests" "$detail"

tput_device=()
if python bench/throughput.py --help | grep -q -- '--device'; then tput_device=(--device "$device"); fi
for precision in fp32 bf16; do
  run_step "throughput $precision" "$step_limit" python bench/throughput.py --suite mnist --recipes dfad \
    --budget "$tput_budget" --nproc 0 --precision "$precision" "${tput_device[@]}" --json "$work/throughput-$precision.json"
  where=$([ ${#tput_device[@]} -gt 0 ] && echo "$device" || echo "CPU: throughput.py has no --device")
  add_row "throughput $precision" "$(summary throughput "$work/throughput-$precision.json") ($where)"
done

run_step teacher "$step_limit" python bench/train_teacher.py "${teacher_args[@]}" --out "$work/teacher.safetensors"
add_row teacher "${teacher_args[*]}: $(summary teacher "$work/logs/teacher.log")"

if [ -f "$work/teacher.safetensors" ]; then
  run_step gap "$step_limit" python bench/gap.py "${gap_args[@]}" --teacher "$work/teacher.safetensors" \
    --device "$device" --json "$work/gap.json"
  add_row gap "$(summary gap "$work/gap.json")"
else
  step_rc=1 step_s=0
  echo "no teacher" >"$work/logs/gap.log"
  add_row gap "skipped"
fi

hardware=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')")
table=$(
  echo "**bench/gpu.sh$( ((smoke)) && echo ' --smoke') on $(uname -n): $hardware, $(nproc) CPU cores, $(date -u +%Y-%m-%dT%H:%MZ)**"
  echo
  echo "| step | result | wall s | detail |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
)
echo "$table"
mkdir -p "$(dirname "$out")"
echo "$table" >"$out"
exit "$failed"
