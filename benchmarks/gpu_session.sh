#!/usr/bin/env bash
# One GPU session (H100/H200, no network), run from the repository root:
#   bash benchmarks/gpu_session.sh
# It is sized for ONE call of the device tool: the whole session ends within TOTAL seconds (default 540,
# under the tool's 600 s per command), and under the tool's $OUT (at most 8 files come back) it leaves two:
# gpu_session.tgz (every log and JSON) and session.json (device, date, commit, each part's exit code and
# seconds), both rewritten after every part, so a session cut short still returns what it measured.
# Without $OUT everything goes to benchmarks/results/<device-name>/<UTC date-time>/, unpacked.
#
# The parts, in order of what the open issues need most (each with its own cap, every cap clamped to the
# time left; a part that fails or times out is recorded and the next one still runs; a part with less than
# MIN_PART seconds left is recorded as "skipped"):
#   build         pip install -e . with the CUDA extension (LPA_BUILD_CUDA=1, LPA_CUDA_ARCH=90)
#   pytest_gpu    pytest -m gpu (with pytest-xdist: PYTEST_WORKERS processes), interrupted with SIGINT at its
#                 cap so that pytest still writes its summary and junit XML
#   static        lpa-bench static --arch 90a --measure: compiled-code facts, modelled and measured times,
#                 head_pgd_'s two forms timed side by side against the model's choice
#   bench         lpa-bench --ops $BENCH_OPS (default: the training step and head_pgd_ rows) --json --plot
#   profile_step  python -m lpa_bench.profile_step: kernels, launches, device and host time per training step
#   memcheck, racecheck   compute-sanitizer over benchmarks/sanitize_cuda.py
# Files: nvidia-smi.txt, cutlass_wheel.log, build.log, backend_info.json, pytest_gpu.{log,xml}, static.{log,json},
# bench.{log,json,png}, profile_step.{log,json}, memcheck.log, racecheck.log, steps.tsv, session.json.
#
# DRY_RUN=S (seconds) replaces every part, and the device queries, by `sleep S`: the CPU test of this
# schedule (tests/benchmarks/test_gpu_session.py).
set -u -o pipefail

TOTAL=${TOTAL:-540}
MIN_PART=${MIN_PART:-10}
T_BUILD=${T_BUILD:-200}  # the CUTLASS sm_90a GEMM adds ~60 s of nvcc on 2 cores (125 s vs 66 s in all)
T_PYTEST=${T_PYTEST:-200}
T_STATIC=${T_STATIC:-150}  # compiling for sm_90a, then timing each case (autotuning included)
T_BENCH=${T_BENCH:-120}
BENCH_MARGIN=${BENCH_MARGIN:-30}  # lpa-bench stops starting new cases this long before its part's limit
T_PROFILE=${T_PROFILE:-45}
T_SANITIZER=${T_SANITIZER:-45}  # each of memcheck and racecheck
BENCH_OPS=${BENCH_OPS:-train_step head_pgd_}
PYTEST_WORKERS=${PYTEST_WORKERS:-4}
DRY_RUN=${DRY_RUN:-}

cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -n $DRY_RUN ]]; then
    DEVICE=dry-run
else
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
DEVICE=${DEVICE:-unknown-device}
SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMIT=$(git rev-parse HEAD 2>/dev/null) || COMMIT=unknown
if [[ -n ${OUT:-} ]]; then
    PACK=$OUT  # the device tool's folder: two files, rewritten after every part
    RESULTS=$(mktemp -d)/gpu_session
else
    PACK=
    RESULTS=$ROOT/benchmarks/results/$SLUG/$(date -u +%Y-%m-%d-%H%M)
fi
mkdir -p "$RESULTS"
STEPS="$RESULTS/steps.tsv"
: > "$STEPS"

# session.json from steps.tsv; then, under $OUT, the archive and a copy of session.json.
publish() {
    python3 - "$RESULTS" "$DEVICE" "$DATE" "$COMMIT" "$TOTAL" <<'EOF'
import json, sys
results, device, date, commit, total = sys.argv[1:]
steps = {}
for line in open(f"{results}/steps.tsv"):
    name, rc, seconds, limit = line.rstrip("\n").split("\t")
    steps[name] = {"exit_code": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds),
                   "limit_s": int(limit)}
json.dump({"device": device, "date": date, "git_commit": commit, "total_s": int(total), "steps": steps},
          open(f"{results}/session.json", "w"), indent=1)
EOF
    if [[ -n $PACK ]]; then
        tar czf "$PACK/gpu_session.tgz.part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
            && mv "$PACK/gpu_session.tgz.part" "$PACK/gpu_session.tgz"
        cp "$RESULTS/session.json" "$PACK/session.json"
    fi
}

# limit CAP: the cap clamped to the time left.
limit() {
    local left=$((TOTAL - SECONDS))
    echo $(($1 < left ? $1 : left))
}

# part NAME CAP LOG COMMAND...: run with the cap clamped to the time left (SIGINT at the limit, SIGKILL 15 s
# later), log stdout+stderr, record exit code, seconds and limit (124 = timed out), publish.
part() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((TOTAL - SECONDS))
    local limit
    limit=$(limit "$cap")
    if ((limit < MIN_PART)); then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$STEPS"
        echo "== $name skipped: ${left}s left of ${TOTAL}s"
        publish
        return
    fi
    echo "== $name (limit ${limit}s) -> $log: $*"
    local start=$SECONDS
    if [[ -n $DRY_RUN ]]; then
        set -- sleep "$DRY_RUN"
    fi
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$STEPS"
    echo "   exit $rc after $((SECONDS - start))s"
    tail -n 3 "$log"
    publish
}

# Kernels run on the GPU itself, with no poisoned outputs or forced backend.
unset TRITON_INTERPRET LPA_POISON LPA_BACKEND
export PYTHONUNBUFFERED=1
export LPA_CUDA_ARCH=${LPA_CUDA_ARCH:-90}  # H100 and H200 are sm_90: build only that
# lpa_bench is the benchmarks/ folder under another name: make it importable even if the install fails.
SHIM=$(mktemp -d)
ln -s "$ROOT/benchmarks" "$SHIM/lpa_bench"
export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"

# The CUTLASS/CuTe headers come from the nvidia-cutlass wheel, and the GPU machine has no package registry:
# copy the wheel into the working tree before the run (untracked, so the device tool carries it; not
# committed). Without it the CUTLASS GEMMs build as stubs (backend_info.json says why), their GPU tests
# fail with that reason, and the wmma kernel serves linear_perturb.
CUTLASS_WHEEL=${CUTLASS_WHEEL:-wheels/nvidia_cutlass-4.2.0.0-py3-none-any.whl}
if [[ -n $DRY_RUN ]]; then
    echo "dry run" | tee "$RESULTS/nvidia-smi.txt" "$RESULTS/cutlass_wheel.log" > "$RESULTS/backend_info.json"
else
    nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
    if [[ -f $CUTLASS_WHEEL ]]; then
        python -m pip install -q --no-deps --no-index "$CUTLASS_WHEEL" > "$RESULTS/cutlass_wheel.log" 2>&1
    else
        echo "no $CUTLASS_WHEEL: the CUTLASS GEMMs build as stubs" | tee "$RESULTS/cutlass_wheel.log"
    fi
fi
part build "$T_BUILD" "$RESULTS/build.log" \
    env LPA_BUILD_CUDA=1 python -m pip install --no-build-isolation --no-deps -e .
if [[ -z $DRY_RUN ]]; then
    python -c "import json, lpa_kernels; print(json.dumps(lpa_kernels.backend_info(), indent=1))" \
        > "$RESULTS/backend_info.json" 2>&1
fi

PYTEST_ARGS=(-m gpu -q -rfE -p no:cacheprovider --junitxml "$RESULTS/pytest_gpu.xml")
python -c "import pytest_benchmark" 2>/dev/null && PYTEST_ARGS+=(--benchmark-disable)
python -c "import xdist" 2>/dev/null && ((PYTEST_WORKERS > 1)) && PYTEST_ARGS+=(-n "$PYTEST_WORKERS")
part pytest_gpu "$T_PYTEST" "$RESULTS/pytest_gpu.log" python -m pytest "${PYTEST_ARGS[@]}"

part static "$T_STATIC" "$RESULTS/static.log" python -m lpa_bench.cli static --arch 90a --measure \
    --json "$RESULTS/static.json"

# lpa-bench's budget follows the part's limit (clamped when earlier parts ran long), so that it stops
# starting cases before the SIGINT; the budget never goes below 0
BENCH_LIMIT=$(limit "$T_BENCH")
BENCH_BUDGET=$((BENCH_LIMIT > BENCH_MARGIN ? BENCH_LIMIT - BENCH_MARGIN : 0))
# shellcheck disable=SC2086  # BENCH_OPS is a list of op names
part bench "$BENCH_LIMIT" "$RESULTS/bench.log" python -m lpa_bench.cli --ops $BENCH_OPS \
    --json "$RESULTS/bench.json" --plot "$RESULTS/bench.png" --budget-s "$BENCH_BUDGET"

part profile_step "$T_PROFILE" "$RESULTS/profile_step.log" python -m lpa_bench.profile_step \
    --json "$RESULTS/profile_step.json"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
    if [[ -z $DRY_RUN && ! -x $SANITIZER ]]; then
        echo "compute-sanitizer not found: skipped" > "$RESULTS/$tool.log"
        printf '%s\tskipped\t0\t0\n' "$tool" >> "$STEPS"
        publish
        continue
    fi
    # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
    part "$tool" "$T_SANITIZER" "$RESULTS/$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 python benchmarks/sanitize_cuda.py
done

rm -rf "$SHIM"
cat "$RESULTS/session.json"; echo
echo "results in ${PACK:-$RESULTS}"
