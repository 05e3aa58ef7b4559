#!/usr/bin/env bash
# One device call: GPU tests (kernels, fused model paths) then the op benchmark.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
# the package itself (its entry point makes backend="ccgqa" resolvable)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout "${TEST_TIMEOUT:-130}" python3 -m pytest -q -x -m cuda -p no:cacheprovider tests ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-170}" python3 -m ccgqa_compile.bench --plot --save "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
