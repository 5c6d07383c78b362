#!/usr/bin/env bash
# One GPU session (H100/H200, no network), run from the repository root:
#   bash benchmarks/gpu_session.sh
# 1. builds the package with its CUDA extension, 2. runs `pytest -m gpu`, 3. runs compute-sanitizer
# memcheck and racecheck over benchmarks/sanitize_cuda.py, 4. runs the lpa-bench sweep with --json and
# --plot. Every part has its own timeout (seconds, overridable by the variables below) and the whole
# is capped at about 13 minutes (most parts end well before their caps); a part that fails or times out is recorded and the next one still runs.
# 5. profiles the training step (benchmarks/profile_step.py), 6. runs `lpa-bench static --measure` for sm_90a
# (compiled-code facts and modelled times, with each case's measured time and measured/modelled ratio).
# Through a tool that returns few files, pack them: `OUT=/tmp/s bash benchmarks/gpu_session.sh; tar czf ...`.
# Everything goes to $OUT, or to benchmarks/results/<device-name>/ when OUT is unset:
#   session.json (device, date, commit, each part's exit code and seconds), nvidia-smi.txt,
#   build.log, backend_info.json, pytest_gpu.log, pytest_gpu.xml, memcheck.log, racecheck.log,
#   bench.json, bench.png, bench.log, profile_step.{log,json}, static.{log,json}.
set -u -o pipefail

T_BUILD=${T_BUILD:-200}  # the CUTLASS sm_90a GEMM adds ~60 s of nvcc (2 cores: 125 s vs 66 s in all)
T_PYTEST=${T_PYTEST:-150}
T_SANITIZER=${T_SANITIZER:-45}      # each of memcheck and racecheck
T_BENCH=${T_BENCH:-150}
BENCH_BUDGET=${BENCH_BUDGET:-$((T_BENCH - 40))}  # lpa-bench stops starting new cases after this
T_PROFILE=${T_PROFILE:-45}
T_STATIC=${T_STATIC:-150}  # compiling for sm_90a, then timing each case (autotuning included)

cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
DEVICE=${DEVICE:-unknown-device}
SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
OUT=${OUT:-$ROOT/benchmarks/results/$SLUG}
mkdir -p "$OUT"
COMMIT=$(git rev-parse HEAD 2>/dev/null) || COMMIT=unknown
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# Kernels run on the GPU itself, with no poisoned outputs or forced backend.
unset TRITON_INTERPRET LPA_POISON LPA_BACKEND
export LPA_CUDA_ARCH=${LPA_CUDA_ARCH:-90}  # H100 and H200 are sm_90: build only that
# lpa_bench is the benchmarks/ folder under another name: make it importable even if the install fails.
SHIM=$(mktemp -d)
ln -s "$ROOT/benchmarks" "$SHIM/lpa_bench"
export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"

STEPS="$OUT/steps.tsv"
: > "$STEPS"
# step NAME TIMEOUT LOG COMMAND...: run with a timeout, log stdout+stderr, record exit code and seconds.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (timeout ${limit}s) -> $log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS"
    echo "   exit $rc after $((SECONDS - start))s"
    tail -n 3 "$log"
}

# The CUTLASS/CuTe headers come from the nvidia-cutlass wheel, and this machine has no package registry:
# copy the wheel into the working tree before the run (untracked, so the device tool carries it; not
# committed). Without it the CUTLASS GEMMs build as stubs (backend_info.json says why), their GPU tests
# fail with that reason, and the wmma kernel serves linear_perturb.
CUTLASS_WHEEL=${CUTLASS_WHEEL:-wheels/nvidia_cutlass-4.2.0.0-py3-none-any.whl}
if [[ -f $CUTLASS_WHEEL ]]; then
    python -m pip install -q --no-deps --no-index "$CUTLASS_WHEEL" > "$OUT/cutlass_wheel.log" 2>&1
else
    echo "no $CUTLASS_WHEEL: the CUTLASS GEMMs build as stubs" | tee "$OUT/cutlass_wheel.log"
fi
step build "$T_BUILD" "$OUT/build.log" \
    env LPA_BUILD_CUDA=1 python -m pip install --no-build-isolation --no-deps -e .
python -c "import json, lpa_kernels; print(json.dumps(lpa_kernels.backend_info(), indent=1))" \
    > "$OUT/backend_info.json" 2>&1

PYTEST_ARGS=(-m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml")
python -c "import pytest_benchmark" 2>/dev/null && PYTEST_ARGS+=(--benchmark-disable)
step pytest_gpu "$T_PYTEST" "$OUT/pytest_gpu.log" python -m pytest "${PYTEST_ARGS[@]}"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [[ ! -f benchmarks/sanitize_cuda.py ]]; then
    echo "benchmarks/sanitize_cuda.py is absent: compute-sanitizer skipped" | tee "$OUT/memcheck.log" "$OUT/racecheck.log"
    printf 'memcheck\tskipped\t0\nracecheck\tskipped\t0\n' >> "$STEPS"
elif [[ ! -x $SANITIZER ]]; then
    echo "compute-sanitizer not found: skipped" | tee "$OUT/memcheck.log" "$OUT/racecheck.log"
    printf 'memcheck\tskipped\t0\nracecheck\tskipped\t0\n' >> "$STEPS"
else
    # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
    for tool in memcheck racecheck; do
        step "$tool" "$T_SANITIZER" "$OUT/$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$SANITIZER" --tool "$tool" --error-exitcode 1 python benchmarks/sanitize_cuda.py
    done
fi

step bench "$T_BENCH" "$OUT/bench.log" python -m lpa_bench.cli \
    --json "$OUT/bench.json" --plot "$OUT/bench.png" --budget-s "$BENCH_BUDGET"

# Where a training step's device time goes (kernels and launches per step), and the compiled-code report
# whose modelled times the measured ones above check.
step profile_step "$T_PROFILE" "$OUT/profile_step.log" python -m lpa_bench.profile_step --json "$OUT/profile_step.json"
step static "$T_STATIC" "$OUT/static.log" python -m lpa_bench.cli static --arch 90a --measure --json "$OUT/static.json"

python - "$OUT" "$DEVICE" "$DATE" "$COMMIT" <<'EOF'
import json, sys
out, device, date, commit = sys.argv[1:]
steps = {}
for line in open(f"{out}/steps.tsv"):
    name, rc, seconds = line.rstrip("\n").split("\t")
    steps[name] = {"exit_code": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds)}
json.dump({"device": device, "date": date, "git_commit": commit, "steps": steps}, open(f"{out}/session.json", "w"), indent=1)
print(json.dumps(steps))
EOF
rm -rf "$SHIM"
echo "results in $OUT"
