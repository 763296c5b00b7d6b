#!/bin/bash
# The CUDA backend's check on a GPU machine, in two halves:
#
#   scripts/device-check.sh build   # here: the test binary (go test -c -tags cuda) into .device/
#   scripts/device-check.sh run     # on the GPU machine (no Go there), from the repository root
#
# run: the kernels conformance suite on the GPU (every op against float64
# loops, the same suite the CPU backend passes), the HuggingFace reference
# cases (greedy ids identical, logits within 1e-2), and decode/prefill of
# 2-layer qwen2-7b and qwen2-72b against PyTorch eager on the same GPU.
# The CUDA libraries are found through $QWENFLEET_CUDA_LIBS, which this
# script points at a PyTorch install's nvidia/*/lib when there is one.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
  export GOTOOLCHAIN=local CGO_ENABLED=0
  mkdir -p .device
  go test -c -tags cuda -o .device/cuda.test ./pkg/kernels/cuda || exit 1
  ls -l .device
  ;;
run)
  [ -x .device/cuda.test ] || { echo "device-check: .device/cuda.test missing (run 'build' first and carry .device)" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  libs=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "*", "lib", "lib*.so*"))})
print(":".join(dirs))
PY
)
  export QWENFLEET_CUDA_LIBS="${QWENFLEET_CUDA_LIBS:-}${libs:+:$libs}"
  echo "== conformance and reference cases"
  (cd pkg/kernels/cuda && timeout 240 ../../../.device/cuda.test -test.v -test.run 'Conformance|ReferenceCases|NoDriver' 2>&1 | grep -E '^(=== RUN|---|\s+---|ok|PASS|FAIL|panic)|model_test|backend_test|cuda:' | grep -v '=== RUN' | head -150)
  echo "== decode and prefill (qwenfleet)"
  (cd pkg/kernels/cuda && timeout 240 ../../../.device/cuda.test -test.run '^$' -test.bench Decode -test.benchtime 64x 2>&1 | grep -vE '^(goos|goarch|pkg|cpu):')
  echo "== decode and prefill (PyTorch eager)"
  timeout 240 python3 scripts/torch_bench.py 2>&1 | tail -20
  ;;
*)
  echo "usage: scripts/device-check.sh build|run" >&2
  exit 2
  ;;
esac
