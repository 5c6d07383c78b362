#!/usr/bin/env bash
# Second H200 call of 2026-11-30: the head_pgd_ rewrite (commit in commit.txt) on the GPU.
set -u -o pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET LPA_POISON LPA_BACKEND
R=/tmp/res2; mkdir -p $R
SHIM=$(mktemp -d); ln -s "$PWD/benchmarks" "$SHIM/lpa_bench"; export PYTHONPATH="$PWD:$SHIM"
t0=$SECONDS
LPA_BUILD_CUDA=1 LPA_CUDA_ARCH=90 timeout 100 python -m pip install --no-build-isolation --no-deps -e . > $R/build.log 2>&1; echo "build rc=$? $((SECONDS-t0))s"
timeout 130 python -m pytest -m gpu -n 8 -q -p no:cacheprovider tests/head_pgd tests/lpa/test_step_syncs.py tests/lpa/test_backends.py > $R/pytest_gpu.log 2>&1; echo "pytest rc=$? $((SECONDS-t0))s"; tail -4 $R/pytest_gpu.log
timeout 45 python -m lpa_bench.profile_step --steps 5 --json $R/profile_step.json > $R/profile_step.log 2>&1; echo "profile rc=$? $((SECONDS-t0))s"
timeout 200 python -m lpa_bench.cli --ops head_pgd_ train_step class_grad pgd_step_ class_grad_pgd_step_ --dtypes bfloat16 float32 --budget-s 170 --json $R/bench.json > $R/bench.log 2>&1; echo "bench rc=$? $((SECONDS-t0))s"
cat $R/profile_step.log | grep -v USDT | head -60
grep -E "head_pgd_|mlp_step" $R/bench.log | cut -c1-190
tar czf $OUT/res2.tgz -C /tmp res2
