#!/usr/bin/env bash
# The GPU suite as device-machine commands (one command may run 10 minutes at most, so the suite is in parts).
# Usage on the device machine, from the repo root, with the .whl wheels carried:
#   bash benchmarks/device_suite.sh e2e      # workload W: qsparse, Inductor, eager, Flex+fp8 (~580 s at 480p)
#   bash benchmarks/device_suite.sh e2e2     # torchao fp8 and the CUDA-graph qsparse row (~250 s + compile)
#   bash benchmarks/device_suite.sh tests    # every @gpu test, file by file, results appended as they finish
# Results land in $OUT; partial results survive a time limit (JSON after every row, test lines as they come).
set -u
OUT=${OUT:-/tmp/qsparse-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
case "${1:-e2e}" in
  e2e)
    timeout 580 python3 benchmarks/bench_e2e.py --workload "${WORKLOAD:-wan-1.3b-480p}" \
        --rows qsparse,inductor,eager,flex-fp8 --out "$OUT/e2e.json" --profile "$OUT/prof" 2>&1 | grep -v Warning | tail -20 ;;
  e2e2)
    timeout 580 python3 benchmarks/bench_e2e.py --workload "${WORKLOAD:-wan-1.3b-480p}" \
        --rows fp8,qsparse-cudagraphs --out "$OUT/e2e2.json" --profile "$OUT/prof" 2>&1 | grep -v Warning | tail -12 ;;
  tests)
    for file in $(grep -rl "mark.gpu\|pytest.mark.gpu" tests --include=test_*.py | sort); do
      timeout 120 python3 -m pytest -q -m gpu "$file" --tb=line -rA -p no:cacheprovider 2>&1 \
          | grep -E "^PASSED|^FAILED|^ERROR|^E |passed|failed|^/" | tee -a "$OUT/gpu_tests.txt"
    done ;;
  *) echo "device_suite.sh: unknown part ${1}; use e2e, e2e2 or tests" >&2; exit 2 ;;
esac
