#!/usr/bin/env bash
# The prepared GPU check for safeblend's CUDA path (issue 3). Installs nothing: it runs from
# this checkout (PYTHONPATH, a symlinked package layout) with the torch/triton already on the machine. The step limits add
# up to 8 minutes on one H100 (expected: ~5); every step has its own time limit, its log under $OUT, and a failed step does
# not stop the next one. Ends with a summary of every step.
#
#   bash benchmarks/gpu_check.sh              # logs in $OUT, or ./benchmarks/out if unset
#   BENCH_PRESET=small bash benchmarks/gpu_check.sh   # a quicker end-to-end checkpoint
#
# The default end-to-end checkpoint is tinyllama-1.1b (2.2 GB per model in bf16): generating
# it takes ~1-2 minutes of the e2e step (107 s on a 2-core box), each merge ~10-20 s.
#
# Steps: environment (device, driver, versions) · the Triton tests under the interpreter ·
# the same tests compiled on the GPU plus every `cuda`-marked test · kernel bandwidth against
# a device-to-device copy (bench_kernel.py) · end-to-end merge --device cuda vs --device cpu
# on one generated checkpoint in the page cache (bench_e2e.py).

set -uo pipefail  # no -e on purpose: a failing step is recorded and the check goes on

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/out}"
PY="${PYTHON:-python3}"
PRESET="${BENCH_PRESET:-tinyllama-1.1b}"
WORK="${BENCH_WORK:-${TMPDIR:-/tmp}/safeblend-gpu-check}"
mkdir -p "$OUT" "$WORK"
# The package as pip lays it out (engine/ is `safeblend`, kernels/ is `safeblend.kernels`), made
# of symlinks into this checkout so that nothing is installed on the machine.
LAYOUT="$WORK/import-layout"
rm -rf "$LAYOUT" && mkdir -p "$LAYOUT/safeblend"
ln -s "$REPO"/engine/* "$LAYOUT/safeblend/" && ln -s "$REPO/kernels" "$LAYOUT/safeblend/kernels"
export PYTHONPATH="$LAYOUT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
cd "$REPO" || exit 1

SUMMARY=()
T0=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show the tail.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/$name.log" started rc status
  started=$(date +%s)
  echo
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S) ==="
  timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  tail -n 40 "$log"
  local line
  line=$(printf '%-18s %-24s %4ss  log: %s' "$name" "$status" "$(($(date +%s) - started))" "$log")
  SUMMARY+=("$line")
  echo "--- $line"
}

step environment 20 bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || echo "nvidia-smi failed"
  nproc; free -g | head -2; df -h "'"$WORK"'" | tail -1
  "'"$PY"'" - <<EOF
import platform, numpy, torch, triton
print("python", platform.python_version(), "numpy", numpy.__version__, "torch", torch.__version__,
      "cuda", torch.version.cuda, "triton", triton.__version__)
from safeblend.kernels import cuda_unavailable_reason
print("cuda_unavailable_reason:", cuda_unavailable_reason())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}.{p.minor}", p.multi_processor_count, "SMs")
EOF'

# The interpreter path CI runs, here too: proves the two modes agree on this machine's stack.
step tests_interpreter 60 env TRITON_INTERPRET=1 "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_triton_kernels.py tests/test_triton_dare.py tests/test_cuda_pipeline.py

# Compiled kernels on the GPU (same test file, now on CUDA tensors) and every cuda-marked test.
step tests_gpu 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_triton_kernels.py tests/test_triton_dare.py tests/test_cuda_pipeline.py
# cuda-marked tests elsewhere in the suite (exit 5, "none collected", counts as ok).
step tests_cuda_other 30 bash -c '"$0" -m pytest -q -rs -p no:cacheprovider -m cuda tests \
  --ignore=tests/test_triton_kernels.py --ignore=tests/test_triton_dare.py --ignore=tests/test_cuda_pipeline.py; rc=$?; [ $rc -eq 5 ] && exit 0; exit $rc' "$PY"

step bench_kernel 50 "$PY" benchmarks/bench_kernel.py --out "$OUT"

step bench_e2e 200 "$PY" benchmarks/bench_e2e.py --preset "$PRESET" --repeats 2 --work "$WORK" --out "$OUT"

echo
echo "=== summary ($(($(date +%s) - T0))s total; logs and JSON in $OUT) ==="
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
for f in "$OUT/bench_kernel.log" "$OUT/bench_e2e.log"; do
  [ -f "$f" ] && grep -E "meets|MISSES|byte-identical|best lerp" "$f"
done
rm -rf "$WORK"/out-cpu "$WORK"/out-cuda
