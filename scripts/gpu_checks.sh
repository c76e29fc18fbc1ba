#!/usr/bin/env bash
# The GPU checks of the attention kernels and the model, in one run (about 8 minutes on an H100):
#   1. the CUDA tests of tests/test_ops_kernels.py (forward, gradients, gradcheck, fp16/bf16, the 800x1333
#      encoder at batch 2, torch.compile, opcheck);
#   2. the same tests, less the large case, under compute-sanitizer memcheck;
#   3. ops/benchmark.py in float32 (with the original Deformable-DETR kernel when ORIGINAL is given) and
#      bfloat16;
#   4. scripts/benchmark.py (whole model, fp32 and --amp).
#
#   bash scripts/gpu_checks.sh [OUTPUT_DIR] [ORIGINAL]
#
# ORIGINAL: a Deformable-DETR (or official DETA) checkout, whose models/ops holds the original kernel.
# Every step's log goes to OUTPUT_DIR (default outputs/gpu_checks); each step is time-limited so that a hang
# cannot eat the rest, and a failing step does not stop the later ones. Exits non-zero if any step failed.
# Copy the figures into docs/BENCHMARKS.md with the command and device.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_checks}
original=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c \
  "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
failed=()

step() {  # step NAME SECONDS COMMAND...: runs the command with a time limit, logging to OUTPUT_DIR/NAME.log
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - start)) s"
  [[ $status == 0 ]] || failed+=("$name")
}

step device 60 python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
step build 300 python3 -c "from ops import build; build.jit_load(with_cuda=True, verbose=True)"
step cuda_tests 300 python3 -m pytest -q -rs tests/test_ops_kernels.py -k "cuda and not nvcc"
# Without the caching allocator every tensor is its own allocation, so memcheck sees accesses past its end.
step memcheck 400 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
  python3 -m pytest -q tests/test_ops_kernels.py -k "cuda and not nvcc and not 800x1333"
step op_float32 300 python3 ops/benchmark.py --device cuda --dtype float32 ${original:+--original "$original"}
step op_bfloat16 200 python3 ops/benchmark.py --device cuda --dtype bfloat16
step model_float32 300 python3 scripts/benchmark.py --device cuda --no_hf
step model_amp 300 python3 scripts/benchmark.py --device cuda --no_hf --amp

if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
