#!/usr/bin/env bash
# One device call: GPU tests (kernels, fused model paths), a kernel profile, then benchmarks.
# Steps are chosen with GPU_STEPS (default "tests bench"); each writes under $OUT. The
# benchmarks append their rows to $OUT/results/<device>.csv: bring them home with
# `python -m ccgqa_compile.bench record <files>/results/*.csv --commit <sha>`, then
# `python -m ccgqa_compile.bench tables` (or set CCGQA_COMMIT=<sha> in the command).
#   tests    pytest -m cuda, all of it (xdist: compiles run in parallel on the host's cores)
#   profile  python -m ccgqa_compile.bench profile (CUDA kernel breakdown per provider;
#            PROFILE_OPS, PROFILE_ARGS)
#   bench    python -m ccgqa_compile.bench --plot (ops; BENCH_OPS, BENCH_ARGS)
#   core     python -m ccgqa_compile.bench core (attention core vs SDPA cuDNN / flash)
#   pkernels python -m ccgqa_compile.bench prologue (prologue kernels vs Inductor)
#   sweep    scripts/sweep_gqa_attention.py $SWEEP_ARGS (the core's launch tables)
#   pytest   python3 -m pytest $PYTEST_ARGS (any selection; log in $OUT/pytest.log)
#   decode   the decode kernel's cuda tests, then scripts/bench_decode.py (decode steps)
#   vshift   scripts/bench_value_shift.py (the value shift's cost, moved / merged / as written)
#   seed     scripts/bench_seed_prologue.py $SEED_ARGS (the seed variant's prologue and module)
#   prologue scripts/sweep_prologue_bwd.py (backward launch sweep; PROLOGUE_ARGS, and
#            PROLOGUE_OLD: a module with another ccgqa_prologue_bwd to time beside it)
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# the package itself (its entry point makes backend="ccgqa" resolvable)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
for step in ${GPU_STEPS:-tests bench}; do
  echo "=== $step"
  case $step in
    # every cuda-marked test (kernel-path variants included), 3 hypothesis examples per
    # corpus entry: about 2.5 minutes on the H100 host's 16 cores (2026-11-24)
    tests) CCGQA_TEST_EXAMPLES=${CCGQA_TEST_EXAMPLES:-3} timeout "${TEST_TIMEOUT:-540}" \
             python3 -m pytest -v -n "${TEST_WORKERS:-15}" -m cuda -p no:cacheprovider \
             --tb=short -rfE tests ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/gpu_tests.log" 2>&1
           echo "pytest rc=$?"
           grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | grep -v "^E " | tail -60 ;;
    profile) timeout "${PROFILE_TIMEOUT:-200}" python3 -m ccgqa_compile.bench profile \
             --ops "${PROFILE_OPS:-rmsnorm,swiglu,rope}" ${PROFILE_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/profile.log" ;;
    bench) timeout "${BENCH_TIMEOUT:-300}" python3 -m ccgqa_compile.bench --plot --save "$OUT" \
             --results "$OUT/results" --ops "${BENCH_OPS:-rmsnorm,swiglu,rope,attention}" ${BENCH_ARGS:-} 2>&1 \
             | grep -v -i warn | tee "$OUT/bench.log" | tail -60 ;;
    # eval: PYTEST_ARGS may hold quoted words (-k 'not slow')
    pytest) eval "timeout ${TEST_TIMEOUT:-300} python3 -m pytest -p no:cacheprovider $PYTEST_ARGS" \
             > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"; tail -5 "$OUT/pytest.log" ;;
    sweep) timeout "${SWEEP_TIMEOUT:-400}" python3 scripts/sweep_gqa_attention.py --out "$OUT" \
             ${SWEEP_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/sweep.log" | tail -60 ;;
    decode) python3 -m pytest -q -m cuda -p no:cacheprovider tests/kernels/test_gqa_decode_kernels.py \
             2>&1 | tail -15 | tee "$OUT/decode_tests.log"
            timeout "${DECODE_TIMEOUT:-480}" python3 scripts/bench_decode.py --out "$OUT" \
             --workers "${DECODE_WORKERS:-6}" 2>&1 | grep -v -i warn | tee "$OUT/bench_decode.log" | tail -40 ;;
    vshift) timeout "${VSHIFT_TIMEOUT:-200}" python3 scripts/bench_value_shift.py 2>&1 \
             | grep -v -i warn | tee "$OUT/value_shift.log" | tail -30 ;;
    prologue) timeout "${PROLOGUE_TIMEOUT:-400}" python3 scripts/sweep_prologue_bwd.py --out "$OUT" \
             ${PROLOGUE_OLD:+--old "$PROLOGUE_OLD"} ${PROLOGUE_ARGS:-} 2>&1 | grep -v -i warn \
             | tee "$OUT/sweep_prologue_bwd.log" | tail -80 ;;
    seed) timeout "${SEED_TIMEOUT:-400}" python3 scripts/bench_seed_prologue.py --out "$OUT" \
             ${SEED_ARGS:---configs 1 --block} 2>&1 | grep -v -i warn \
             | tee "$OUT/bench_seed_prologue.log" | tail -60 ;;
    core) timeout "${CORE_TIMEOUT:-200}" python3 -m ccgqa_compile.bench core --out "$OUT" \
             --results "$OUT/results" 2>&1 | tee "$OUT/core.log" | tail -30 ;;
    pkernels) timeout "${PKERNELS_TIMEOUT:-300}" python3 -m ccgqa_compile.bench prologue --out "$OUT" \
             --results "$OUT/results" 2>&1 | grep -v -i warn | tee "$OUT/prologue.log" | tail -30 ;;
  esac
done
