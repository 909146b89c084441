#!/usr/bin/env bash
# One device-machine command for the whole GPU suite (device time is scarce: everything in one call).
# Usage on the device machine, from the repo root, with the .whl wheels carried:  bash benchmarks/device_suite.sh
# Each part has its own time limit, so a slow part cannot starve the others; results land in $OUT.
set -u
OUT=${OUT:-/tmp/qsparse-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
timeout "${E2E_S:-330}" python3 benchmarks/bench_e2e.py --workload wan-1.3b-480p \
    --rows "${E2E_ROWS:-qsparse,inductor,eager,flex-fp8,fp8}" --out "$OUT/e2e.json" 2>&1 | grep -v Warning | tail -12
timeout "${EVAL_S:-140}" python3 -m qsparse_compiler.cli eval --out "$OUT/fidelity" --seeds 0,1 --steps 20 \
    --variants "${EVAL_ROWS:-w4a8,sparse,naive,ssar1,ssar2,lowrank}" 2>&1 | tail -12
timeout "${TESTS_S:-90}" python3 -m pytest -q -x -m gpu tests/backend/test_gpu_backend.py tests/reliability/test_fuzz_ops.py \
    2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
