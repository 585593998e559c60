#!/usr/bin/env bash
# krflows on a GPU in one go (issue 16, goal 3): the card, the CUDA tests, a `krflows fit` run on
# the GPU and the training benchmark at B = 4096 and 65536 against zuko: eager, compiled, and
# sampling compiled with CUDA graphs (three runs, each under its own time limit, so that a slow
# compilation or a crash cannot take the others with it), written to benchmarks/RESULTS_gpu.md
# with the card's name. On a bare H100 (2026-11-27, torch 2.11) the steps took 386 s one after
# the other, 220 s of it the compiled runs' cold compilation; so the untimed steps (CUDA tests,
# fit) now run side by side with two warm-up runs of the compiled benchmarks (tiny settings, same
# compiled graphs: they fill inductor's on-disk caches), and only then, alone on the GPU, the
# three timed runs and a profile of compiled sampling. Set GPU_CHECK_*_TIMEOUT to fit a lease.
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run       # the same steps on the CPU, tiny budgets (~2 min)
#   bash benchmarks/gpu_check.sh --out PATH      # another report file
#
# Needs krflows[bench] installed (zuko, nflows) in the Python that $PYTHON names (default
# `python`). Every step runs even if an earlier one failed; the exit status is 1 if any failed.
set -euo pipefail

DRY=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out PATH)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python}"
export PYTHONFAULTHANDLER=1  # a crash (segfault) logs the Python stack of every thread
WORK="$(mktemp -d "${TMPDIR:-/tmp}/krflows_gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if [[ $DRY == 1 ]]; then
  OUT="${OUT:-$WORK/RESULTS_gpu_dryrun.md}"
  ACCEL=cpu; DEVICE=cpu; FIT_STEPS=5
  BENCH=(--device cpu --quick --batches 64 256 --libs krflows,zuko --threads 1)
  BENCH_COMPILED=(--device cpu --quick --batches 64 256 --libs krflows-compile,zuko-compile --threads 1
                  --dynamic --sample-only)
  CUDA_TESTS=(tests/test_cuda.py -m cuda -q -p no:cacheprovider)
  PROFILE=(--device cpu --table --sample krflows-compile 64)
else
  OUT="${OUT:-benchmarks/RESULTS_gpu.md}"
  ACCEL=gpu; DEVICE=cuda; FIT_STEPS=500
  # A/B libraries, not yet measured on a GPU (drop them once they are): krflows*-unfolded, the same
  # flows without the fold of the conditioners' bias and clamp into the spline's kernels
  # (Spline.folds); krflows-compile-blocked, with the masked layers' block products (B = 65536)
  BENCH=(--device cuda --batches 4096 65536 --libs "${GPU_CHECK_LIBS:-krflows,krflows-unfolded,zuko}")
  # compiled once per library for both batch sizes (--dynamic), sampling only (--sample-only):
  # on a bare machine every compilation is cold, and the inverse's (log_prob: d passes per layer,
  # unrolled) took minutes, which made the first GPU run overrun its lease
  BENCH_COMPILED=(--device cuda --batches 4096 65536 --dynamic --sample-only
                  --libs "${GPU_CHECK_COMPILED_LIBS:-krflows-compile,krflows-compile-unfolded,krflows-compile-blocked,zuko-compile}")
  # CUDA graphs in a run of their own, last, both libraries (like for like), sampling only: on
  # torch 2.11 (H100, 2026-11-27) the compiled backward under mode="reduce-overhead" segfaulted
  # in zuko's training step as in krflows' (each library alone, in its own process), so the
  # training step is not timed there
  BENCH_CUDAGRAPHS=(--device cuda --batches 4096 65536 --dynamic --sample-only
                    --libs "${GPU_CHECK_CUDAGRAPHS_LIBS:-krflows-compile-cg,zuko-compile-cg}")
  CUDA_TESTS=(tests/test_cuda.py -m cuda -q -p no:cacheprovider)
  # where compiled sampling's time goes (wall vs kernel time, launches, top kernels), krflows-compile
  # first in a process of its own: the 2026-11-27 profile of four libraries in one process read
  # 2.28 ms per call where the benchmark measured 1.45 ms; -unfolded: the fold's A/B as kernels
  PROFILE=(--device cuda --table --sample krflows-compile,krflows-compile-unfolded 65536)
fi
[[ $DRY == 1 ]] && BENCH_CUDAGRAPHS=()  # CUDA only

STEPS=()      # "| name | seconds | status |" rows for the report
FAILED=0

BG=()         # the steps running in the background

# since START [FORMAT]: seconds elapsed since START (a `date +%s.%N` reading), printed with FORMAT
since() { awk -v a="$1" -v b="$(date +%s.%N)" -v f="${2:-%.1f}" 'BEGIN { printf f, b - a }'; }

# start_step NAME CMD...: runs CMD in the background, its output in $WORK/NAME.log; wait_steps
# records it. For the untimed steps only (they share the GPU and the CPU with each other).
start_step() {
  local name="$1"; shift
  echo "=== [gpu_check] $name (side by side): $*"
  (
    start=$(date +%s.%N)
    if "$@" > "$WORK/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; fi
    secs=$(since "$start")
    printf '%s\n%s\n' "$secs" "$status" > "$WORK/$name.status"
  ) &
  BG+=("$name")
}

wait_steps() {
  local name secs status
  wait
  for name in "${BG[@]}"; do
    { read -r secs && read -r status; } < "$WORK/$name.status" || { secs="?"; status="FAILED (no status)"; }
    tail -n 3 "$WORK/$name.log" || true
    echo "=== [gpu_check] $name: $status in $secs s"
    STEPS+=("| $name | $secs | $status |")
    if [[ $status != ok ]]; then FAILED=1; fi
  done
  BG=()
}

# run_step NAME CMD...: runs CMD with its output on the terminal and in $WORK/NAME.log, prints
# and records its wall time; a failure is recorded, not fatal.
run_step() {
  local name="$1"; shift
  local start secs status
  echo "=== [gpu_check] $name: $*"
  start=$(date +%s.%N)
  if "$@" 2>&1 | tee "$WORK/$name.log"; then status=ok; else status="FAILED (exit ${PIPESTATUS[0]})"; FAILED=1; fi
  secs=$(since "$start")
  echo "=== [gpu_check] $name: $status in $secs s"
  STEPS+=("| $name | $secs | $status |")
}

card_info() {
  if [[ $DRY == 1 ]]; then
    echo "dry run on the CPU: no GPU used"
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true
    return 0
  fi
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device:', torch.cuda.get_device_name())"
}

fit_on_device() {
  "$PYTHON" -m krflows.cli fit --model.target banana --trainer.accelerator "$ACCEL" \
    --trainer.max_steps "$FIT_STEPS" --trainer.enable_progress_bar false \
    --root_dir "$WORK/runs" --name gpu_check
  test -s "$WORK/runs/gpu_check/report.md"
}

TOTAL_START=$(date +%s.%N)
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-300}"  # seconds for the eager benchmark run
COMPILED_TIMEOUT="${GPU_CHECK_COMPILED_TIMEOUT:-$BENCH_TIMEOUT}"  # and for the compiled one
CUDAGRAPHS_TIMEOUT="${GPU_CHECK_CUDAGRAPHS_TIMEOUT:-200}"  # and for the CUDA-graphs one (0: skip it)
PROFILE_TIMEOUT="${GPU_CHECK_PROFILE_TIMEOUT:-90}"  # and for the profile (0: skip it)
[[ $CUDAGRAPHS_TIMEOUT == 0 ]] && BENCH_CUDAGRAPHS=()
run_step card card_info
# untimed, side by side: the correctness steps, and the compiled runs' compilation (tiny settings,
# the same graphs: --dynamic compiles one graph for every batch size; their numbers are not kept)
start_step cuda_tests "$PYTHON" -m pytest "${CUDA_TESTS[@]}"
start_step fit fit_on_device
start_step warm_compiled timeout "$COMPILED_TIMEOUT" "$PYTHON" benchmarks/bench_training.py \
  "${BENCH_COMPILED[@]}" --quick --batches 64 --only timing throughput --out "$WORK/warm_compiled.md"
if [[ ${#BENCH_CUDAGRAPHS[@]} -gt 0 ]]; then
  start_step warm_cudagraphs timeout "$CUDAGRAPHS_TIMEOUT" "$PYTHON" benchmarks/bench_training.py \
    "${BENCH_CUDAGRAPHS[@]}" --quick --batches 64 --only throughput --out "$WORK/warm_cudagraphs.md"
fi
wait_steps
# timed, one after the other, alone on the device
run_step benchmark timeout "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_training.py "${BENCH[@]}" \
  --only timing throughput --out "$WORK/benchmark.md"
run_step benchmark_compiled timeout "$COMPILED_TIMEOUT" "$PYTHON" benchmarks/bench_training.py \
  "${BENCH_COMPILED[@]}" --only timing throughput --out "$WORK/benchmark_compiled.md"
RUNS=(benchmark benchmark_compiled)
if [[ ${#BENCH_CUDAGRAPHS[@]} -gt 0 ]]; then
  run_step benchmark_cudagraphs timeout "$CUDAGRAPHS_TIMEOUT" "$PYTHON" benchmarks/bench_training.py \
    "${BENCH_CUDAGRAPHS[@]}" --only throughput --out "$WORK/benchmark_cudagraphs.md"
  RUNS+=(benchmark_cudagraphs)
fi
if [[ $PROFILE_TIMEOUT != 0 ]]; then
  run_step profile timeout "$PROFILE_TIMEOUT" "$PYTHON" benchmarks/profile_step.py "${PROFILE[@]}"
fi
TOTAL=$(since "$TOTAL_START" %.0f)

if [[ $DRY == 1 ]]; then
  CARD="none (--dry-run on the CPU)"
else
  CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 || echo unknown)"
fi

mkdir -p "$(dirname "$OUT")"
{
  echo "# krflows GPU check: $CARD"
  echo
  echo "Written by \`bash benchmarks/gpu_check.sh$([[ $DRY == 1 ]] && echo ' --dry-run')\` on" \
       "$(date -u '+%Y-%m-%d %H:%M UTC') in $TOTAL s (device: $DEVICE)."
  [[ $DRY == 1 ]] && echo && echo "**Dry run on the CPU with tiny budgets: the numbers mean nothing.**"
  echo
  echo "| step | wall s | status |"
  echo "|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "CUDA tests (\`pytest -m cuda tests/test_cuda.py\`): $(grep -E '(passed|failed|skipped|error)' \
       "$WORK/cuda_tests.log" | tail -n 1 || echo 'no summary')"
  echo
  echo "\`krflows fit --model.target banana --trainer.accelerator $ACCEL --trainer.max_steps $FIT_STEPS\`:"
  echo
  echo '```'
  grep -E '^(ELBO|ESS/N|log Z|Pareto|missed)' "$WORK/fit.log" || echo "(no summary: see the step's status)"
  echo '```'
  echo
  for run in "${RUNS[@]}"; do
    case $run in
      benchmark) title="Training benchmark, eager" ;;
      benchmark_compiled) title="Training benchmark, compiled" ;;
      *) title="Sampling benchmark, compiled with CUDA graphs (a run of its own: compare with the run above)" ;;
    esac
    if [[ -s "$WORK/$run.md" ]]; then
      sed -e 's/^## /### /' -e "s/^# krflows training benchmark/## $title/" "$WORK/$run.md"
    else
      echo "## $title"
      echo
      echo "(not written: see the step's status; what it logged before it stopped:)"
      echo
      echo '```'
      grep -E '^\[ *[0-9.]+ s\]|^Fatal Python|^Current thread|^  File ' "$WORK/$run.log" | tail -n 30 || true
      echo '```'
    fi
    echo
  done
  if [[ -s "$WORK/profile.log" ]]; then
    echo "## Profile of compiled sampling (\`python benchmarks/profile_step.py ${PROFILE[*]}\`)"
    echo
    echo '```'
    grep -vE 'Warning|warn\(|^USDT|^ *$' "$WORK/profile.log" | tail -n 60
    echo '```'
  fi
} > "$OUT"
echo "=== [gpu_check] wrote $OUT ($TOTAL s in all)"
exit "$FAILED"
