#!/usr/bin/env bash
# One GPU session's check of the op / mv kernels (issue 12), in one call of the device tool:
#
#   OVSS_FAST_COMMIT=$(git rev-parse --short=12 HEAD) bash bench/gpu_session.sh [quick|full] [BUDGET_S]
#
# 1. builds the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0, no package index needed,
#    no open_clip: the GPU machine has neither);
# 2. python -m bench.gpu_check: every op of cuda and triton against float64, and every Triton
#    schedule auto does not pick (split, window, window without symmetry, persistent, tf32x3) on
#    the sizes up to N = 4096; then the regime table (the pipeline's window batches and
#    B = 1 at N = 784..4096; reference eager, torch.compile, cuda, each Triton schedule), started
#    rows only while the budget lasts;
#    LPOSS / LPOSS+ (issue 28): their cases are in the correctness table, their timings at the protocol's sizes
#    (448 x 597, N = 2940, k = 400, C = 21 and 171) come right after it;
#    Before the regime table, the dslo head over 50 whole-image sizes on Triton (issue 26: total and
#    first-call time, autotuner tunings, CUDA-graph captures; at most half the budget left, <= 180 s);
# 3. leaves everything under $OUT (the device tool brings it back): gpu_check.log, build.log,
#    nvidia_smi.txt, and RESULTS.md / results.csv / results_gpu.json, which are bench/'s files with
#    this run's sections and rows added (copy them over bench/ to keep them); full mode adds
#    pytest_gpu.log (the GPU-marked tests of the Triton and CUDA op/mv kernels and of LPOSS / LPOSS+; the latter
#    skip themselves where scipy, their oracle, is missing).
#
# quick (default): gpu_check --quick (no N = 4096 cases except the tf32x3 precision ones, the
# quick regime set: coco_stuff and cityscapes windows, N = 1024 C = 171, N = 4096 C = 21), no
# compute-sanitizer (no CUDA source changed), BUDGET_S (default 330) seconds in all counting
# the build: about 6 minutes. full: every case and regime, with compute-sanitizer, BUDGET_S
# default 420 and at most 150 s of pytest after it (one device command may run 600 s; regime
# rows past the budget are listed as skipped). GPU_CHECK_ARGS adds gpu_check arguments (see below).
# The exit status is gpu_check's (0: all correct),
# or the GPU pytest's when gpu_check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-quick}"
case "$mode" in
  quick|full) ;;
  *) echo "usage: bash bench/gpu_session.sh [quick|full] [BUDGET_S]; got mode '$mode'" >&2; exit 64 ;;
esac
if [ "$mode" = "full" ]; then budget="${2:-420}"; else budget="${2:-330}"; fi
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# a fresh machine autotunes every shape: 20 ms of timing per config instead of Triton's 100
export OVSS_FAST_TRITON_AUTOTUNE_REP_MS="${OVSS_FAST_TRITON_AUTOTUNE_REP_MS:-20}"
py=python3
command -v "$py" >/dev/null || py=python
start=$SECONDS

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  nvidia-smi; } >"$OUT/nvidia_smi.txt" 2>&1
head -2 "$OUT/nvidia_smi.txt"

echo "== build (sm_90 only)"
if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$py" -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED after $((SECONDS - start)) s"
  exit 2
fi
build_s=$((SECONDS - start))
echo "build: ${build_s} s"
"$py" -c "import ovss_fast; print(ovss_fast.available_backends())" 2>&1 | tail -1

cp bench/RESULTS.md bench/results.csv "$OUT/"
[ -f bench/results_gpu.json ] && cp bench/results_gpu.json "$OUT/"
args=(--results-dir "$OUT" --budget-s "$((budget - build_s - 15))")
if [ "$mode" = "quick" ]; then
  args+=(--quick --skip-sanitizer)
fi
# GPU_CHECK_ARGS: more gpu_check arguments, e.g. "--backends triton,triton[persistent] --skip-pipeline"
# for a shorter first look at a few schedules (word-split on spaces)
if [ -n "${GPU_CHECK_ARGS:-}" ]; then
  read -r -a extra <<<"$GPU_CHECK_ARGS"
  args+=("${extra[@]}")
fi
echo "== python -m bench.gpu_check ${args[*]}"
set -o pipefail
"$py" -m bench.gpu_check "${args[@]}" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
# the device's copy of bench/ too (its tree is thrown away, but the command may be followed by more)
cp "$OUT/results_gpu.json" bench/results_gpu.json 2>/dev/null
if [ "$mode" = "full" ]; then
  echo "== GPU-marked pytest (tests/test_triton.py, tests/test_ext_discrepancy.py, tests/test_cuda_lposs.py)"
  timeout 150 "$py" -m pytest tests/test_triton.py tests/test_ext_discrepancy.py tests/test_cuda_lposs.py -m cuda -q \
    -p no:cacheprovider \
    >"$OUT/pytest_gpu.log" 2>&1
  prc=$?
  tail -5 "$OUT/pytest_gpu.log"
  [ "$prc" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$prc
fi
echo "gpu_session: gpu_check exit $rc; $((SECONDS - start)) s in all (build ${build_s} s)"
exit "$rc"
