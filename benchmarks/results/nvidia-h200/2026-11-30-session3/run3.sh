#!/usr/bin/env bash
# Third H200 call of 2026-11-30: the whole GPU suite on the helpers' pgd/CUDA changes, and where
# head_pgd_'s time goes at the LLM-vocabulary shape.
set -u -o pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET LPA_POISON LPA_BACKEND
R=/tmp/res3; mkdir -p $R
SHIM=$(mktemp -d); ln -s "$PWD/benchmarks" "$SHIM/lpa_bench"; export PYTHONPATH="$PWD:$SHIM"
t0=$SECONDS
LPA_BUILD_CUDA=1 LPA_CUDA_ARCH=90 timeout 60 python -m pip install --no-build-isolation --no-deps -e . > $R/build.log 2>&1; echo "build rc=$? $((SECONDS-t0))s"
timeout 125 python -m pytest -m gpu -n 14 -q -p no:cacheprovider > $R/pytest_gpu.log 2>&1; echo "pytest rc=$? $((SECONDS-t0))s"; grep -E "FAILED|passed|failed" $R/pytest_gpu.log | tail -12
timeout 40 python - > $R/head_profile.log 2>&1 <<'PY'
import torch, lpa_kernels
from torch.profiler import profile, ProfilerActivity
for (b, d, k) in [(4096, 4096, 32000), (1024, 2048, 1000)]:
    h = torch.randn(b, d, device="cuda", dtype=torch.bfloat16); w = (torch.randn(k, d, device="cuda") / d**0.5).bfloat16()
    bias = torch.zeros(k, device="cuda", dtype=torch.bfloat16); y = torch.randint(0, k, (b,), device="cuda")
    for backend in ("triton", "cuda"):
        delta = torch.zeros(k, d, device="cuda", dtype=torch.bfloat16)
        run = lambda: lpa_kernels.head_pgd_(h, y, w, bias, delta, 3, 0.01, 0.1, backend=backend)
        run(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(); torch.cuda.synchronize()
        print(f"== {backend} B={b} D={d} K={k} T=3")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
PY
echo "profile rc=$? $((SECONDS-t0))s"; grep -E "^==|Self CUDA time total|softmax|class_reduce|backward|gemm|nvjet|sm90" $R/head_profile.log | cut -c1-160 | head -50
tar czf $OUT/res3.tgz -C /tmp res3
