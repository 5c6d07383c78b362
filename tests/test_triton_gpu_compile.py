"""Every Triton kernel of the package compiles for NVIDIA GPUs (sm_90 = H100, sm_80 = A100), down to
PTX and cubin, without a GPU: a kernel using language the GPU compiler rejects fails here, not first on
the GPU machine. Run it under each Triton version the project supports (3.6 on the GPU machine, 3.9 here).

How: this module is a launch plan for ``lpa_bench.static.compile_worker`` (shared with
``lpa-bench static``), which records the launches in a ``TRITON_INTERPRET=0`` subprocess (``triton.jit``
picks interpreter or compiler when the kernel modules are imported, and the conftest turns the
interpreter on in this process) and compiles each distinct specialisation exactly as
``JITFunction.run`` would (see ``benchmarks/static/capture.py``). The plan calls every launcher with
small CPU tensors of each dtype and each mode/flag the launchers turn into compile-time variants.
Nothing is cached between runs (a fresh Triton cache directory).
"""

from __future__ import annotations

import time

import pytest

from lpa_bench.static import compile_worker

ARCHS = (90, 80)  # H100, A100
DTYPES = ("float32", "float16", "bfloat16", "float64")
# To stay within about a minute on two cores: the first arch compiles every recorded variant, the
# others those of one dtype; an autotuned kernel compiles every config for one variant, its smallest
# config (the last) for the others.
OTHER_ARCH_DTYPE = "bfloat16"
TMA_DTYPES = ("float16", "bfloat16")  # the only dtypes the tensor-descriptor GEMM serves
ONLY_DTYPES = {"linear_perturb._linear_perturb_forward_tma_kernel": TMA_DTYPES,
               # tensor-core tiles: no float64 (head_pgd_ keeps its launch-per-phase form there)
               "head_pgd._class_space_steps_kernel": ("float32", "float16", "bfloat16")}
EVERY_CONFIG_VARIANTS = ("bfloat16 scale gelu", "bfloat16 scale gelu tma bias=True")


# --------------------------------------------------------------------------------------------------
# The launch plan (runs in the compile worker's subprocess).
# --------------------------------------------------------------------------------------------------

MODEL_H100 = False  # the launchers' own CPU answers: the variants below are chosen for them
INSPECT = False  # compiling is the check; lpa-bench static reads the machine code


def record(recorder) -> None:
    """Every launch the launchers make, over every dtype and compile-time variant."""
    import torch

    from lpa_kernels.head_pgd import triton_kernels as head_pgd
    from lpa_kernels.linear_perturb import triton_kernels as linear
    from lpa_kernels.perturb import triton_kernels as perturb
    from lpa_kernels.pgd import triton_kernels as pgd
    from lpa_kernels.step_update import triton_kernels as step_update

    call = recorder.call

    def rand(*shape, dtype):
        return torch.randn(shape).to(getattr(torch, dtype))

    for dt in DTYPES:
        acc = torch.float64 if dt == "float64" else torch.float32
        labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1] * 8)  # B = 64, K = 2
        for mode in ("add", "scale"):
            # perturb: inner == 1 and inner > 1 (F = 64: D = 4 groups of 16 features)
            for inner in (1, 4):
                call(f"{dt} {mode} inner={inner}", perturb.perturb_forward,
                     rand(64, 64, dtype=dt), labels, rand(2, 4, dtype=dt), inner, mode)
            for need_grad_h in (False, True):
                # 2 classes, 64 x 64 rows each (more than one tile): chunked (SPLIT) reduction;
                # 16 classes of one sample each: direct
                call(f"{dt} {mode} grad_h={need_grad_h} split", perturb.perturb_backward,
                     rand(64, 256, dtype=dt), rand(64, 256, dtype=dt), labels, rand(2, 4, dtype=dt),
                     2, 4, 1, mode, need_grad_h, acc)
                call(f"{dt} {mode} grad_h={need_grad_h} direct", perturb.perturb_backward,
                     rand(16, 16, dtype=dt), rand(16, 16, dtype=dt), torch.arange(16), rand(16, 16, dtype=dt),
                     16, 16, 1, mode, need_grad_h, acc)
            if dt != "float64":  # a float64 delta's gradient: float64 accumulators over this data
                call(f"{dt} {mode} float64 delta split", perturb.perturb_backward, rand(64, 256, dtype=dt),
                     rand(64, 256, dtype=dt), labels, rand(2, 4, dtype="float64"), 2, 4, 1, mode, False, torch.float64)
            for norm in ("linf", "l2"):
                step = [torch.rand(2, dtype=acc) for _ in range(3)]
                call(f"{dt} {norm}", pgd.pgd_step, rand(2, 40, dtype=dt), rand(2, 40, dtype=dt), *step, norm)
                call(f"{dt} {norm} guarded", pgd.pgd_step, rand(2, 40, dtype=dt), rand(2, 40, dtype=dt), *step, norm,
                     torch.tensor(True), torch.zeros((), dtype=torch.int64))
                # head_pgd_'s class space: an iterate in acc, its new value also written in the gradient's dtype
                for guard in ((), (torch.tensor(True), torch.zeros((), dtype=torch.int64))):
                    call(f"{dt} {norm} rounded guarded={bool(guard)}", pgd.pgd_step, rand(2, 40, dtype=str(acc)[6:]),
                         rand(2, 40, dtype=dt), *step, norm, *guard, rounded=rand(2, 40, dtype=dt))
                if dt in ("float16", "bfloat16"):  # a float64 iterate rounded straight to 16 bits
                    call(f"{dt} {norm} rounded from float64", pgd.pgd_step, rand(2, 40, dtype="float64"),
                         rand(2, 40, dtype=dt), *(s.double() for s in step), norm, rounded=rand(2, 40, dtype=dt))
                # 2 classes of 300 entries: the (feature block, class) grid (pgd.split_block on the CPU)
                call(f"{dt} {norm} split", pgd.pgd_step, rand(2, 300, dtype=dt), rand(2, 300, dtype=dt), *step, norm)
                call(f"{dt} {norm} split guarded", pgd.pgd_step, rand(2, 300, dtype=dt), rand(2, 300, dtype=dt), *step,
                     norm, torch.tensor(True), torch.zeros((), dtype=torch.int64))
                call(f"{dt} {mode} {norm}", pgd.class_grad_pgd_step, rand(2, 4, dtype=dt), rand(64, 64, dtype=dt),
                     labels, rand(64, 64, dtype=dt), *step, 1, mode, norm)
                for bias, direction in ((True, step[2]), (False, None)):
                    call(f"{dt} {mode} {norm} bias={bias} confidence={direction is None}", head_pgd.head_pgd,
                         rand(8, 24, dtype=dt), labels[:8], rand(2, 24, dtype=dt), rand(2, dtype=dt) if bias else None,
                         rand(2, 24, dtype=dt), 1, step[0], step[1], direction, norm, mode)
                if mode == "add" and norm == "l2" and dt != "float64":  # the fused class space under the step's guard
                    for ok in (torch.tensor(True),) + ((None,) if dt == "float32" else ()):
                        call(f"{dt} guarded fused ok={ok is not None}", head_pgd.head_pgd, rand(8, 24, dtype=dt),
                             labels[:8], rand(2, 24, dtype=dt), rand(2, dtype=dt), rand(2, 24, dtype="float32"), 1,
                             step[0], step[1], step[2], norm, mode, None, ok, torch.zeros((), dtype=torch.int64))
            for activation in ("none", "relu", "gelu", "gelu_tanh", "silu"):
                name = f"{dt} {mode} {activation}"
                # (B, T, IN) = (8, 3, 40) -> N = 24; with and without bias and saved pre-activation. The
                # GEMM compiles slowly: every activation and mode in float32, one of each elsewhere (the
                # epilogue's dtype handling is the same for every activation and mode).
                if dt == "float32" or (activation, mode) == ("gelu", "scale"):
                    call(name, linear.linear_perturb_forward, rand(24, 40, dtype=dt), rand(24, 40, dtype=dt),
                         rand(24, dtype=dt), labels[:8], 3, rand(2, 24, dtype=dt), activation, mode, True)
                if activation == "gelu" and (dt == "float32" or mode == "scale"):
                    call(name + " no-bias no-preact", linear.linear_perturb_forward, rand(24, 40, dtype=dt),
                         rand(24, 40, dtype=dt), None, labels[:8], 3, rand(2, 24, dtype=dt), activation, mode, False)
                preact = rand(0, dtype=dt) if activation == "none" and mode == "add" else rand(24, 24, dtype=dt)
                call(name, linear.linear_perturb_backward_epilogue, rand(24, 24, dtype=dt), preact, labels[:8], 3,
                     rand(2, 24, dtype=dt), activation, mode)
        # the training step's fused ops: statistics, policy and trend state in the compute dtype (float32
        # for the half dtypes); the label plan for int64 and int32 labels
        for label_dtype in (torch.int64, torch.int32):
            for sort in (False, True):
                call(f"{dt} labels={label_dtype} sort={sort}", step_update.checked_label_plan, labels.to(label_dtype),
                     2, torch.zeros(2, dtype=torch.int64), sort)
        for accumulate in (False, True):
            call(f"{dt} accumulate={accumulate}", step_update.class_stats, torch.zeros(3, 2, dtype=acc),
                 rand(64, 2, dtype=dt).to(acc), labels, torch.tensor(True), accumulate)
        trend = (torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.zeros((), dtype=torch.int64))
        for direction, radius, observe in (("fixed", "fixed", False), ("confidence", "confidence", False),
                                           ("loss_trend", "confidence_linear", True)):
            call(f"{dt} {direction} {radius} observe={observe}", step_update.policy, torch.rand(3, 2, dtype=acc),
                 torch.ones(2, dtype=acc), torch.ones(2, dtype=acc), *trend, torch.rand(4, dtype=torch.float64),
                 direction, radius, observe, observe, acc)
        if dt in TMA_DTYPES:  # the tensor-descriptor GEMM of sm_90+ (row stride 80 B: TMA can address it)
            tma_capable, linear.tma_capable = linear.tma_capable, lambda device: True
            for activation, mode, bias in (("gelu", "scale", True), ("relu", "add", False)):
                call(f"{dt} {mode} {activation} tma bias={bias}", linear.linear_perturb_forward,
                     rand(24, 40, dtype=dt), rand(24, 40, dtype=dt), rand(24, dtype=dt) if bias else None,
                     labels[:8], 3, rand(2, 24, dtype=dt), activation, mode, bias)
            linear.tma_capable = tma_capable
        if dt == "float32":  # TF32 GEMM operands when torch allows them
            torch.backends.cuda.matmul.allow_tf32 = True
            call(f"{dt} add gelu tf32", linear.linear_perturb_forward, rand(24, 40, dtype=dt), rand(24, 40, dtype=dt),
                 rand(24, dtype=dt), labels[:8], 3, rand(2, 24, dtype=dt), "gelu", "add", True)
            torch.backends.cuda.matmul.allow_tf32 = False


def configs_to_compile(arch, archs, launch):
    """The first arch compiles every recorded variant, the others those of one dtype; an autotuned
    kernel compiles every config for one variant, its smallest config (the last) for the others."""
    if arch != archs[0] and not launch.variant.startswith(OTHER_ARCH_DTYPE):
        return []
    if arch < 90 and "_tma_" in launch.name:  # no TMA before sm_90
        return []
    if launch.configs is None:
        return [None]
    if arch == archs[0] and launch.variant in EVERY_CONFIG_VARIANTS:
        return launch.configs
    return launch.configs[-1:]


# --------------------------------------------------------------------------------------------------
# Test side.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def summary():
    start = time.perf_counter()
    data = compile_worker.run("tests.test_triton_gpu_compile", ARCHS, timeout=600)
    seconds = time.perf_counter() - start
    if "unavailable" in data:
        pytest.skip(f"Triton's CUDA compiler is unavailable here: {data['unavailable']}")
    print(f"\ntriton {data['triton']}: {sum(not e.get('reused') for e in data['compiled'])} compiles in {seconds:.1f} s")
    for entry in data["compiled"]:
        print(f"  sm_{entry['arch']} {entry['kernel']} [{entry['variant']}] {entry['constexprs']} "
              f"warps={entry['num_warps']} stages={entry['num_stages']} shared={entry['shared']} B "
              f"({entry['seconds']} s)")
    return data


def test_every_kernel_is_launched_for_every_dtype(summary):
    """The capture is complete: each launchable kernel was recorded with inputs of every dtype."""
    recorded = {(name, variant.split()[0]) for name, variant in summary["recorded"]}
    missing = [(name, dt) for name in summary["expected"] for dt in ONLY_DTYPES.get(name, DTYPES)
               if (name, dt) not in recorded]
    assert summary["expected"], "no Triton kernels found in the kernel modules"
    assert not missing, f"kernels never launched by the capture (kernel, dtype): {missing}"


# The most shared memory one block may take, in bytes (the opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90)
# 227 KiB. A kernel over it compiles, and only Triton's launcher on the device refuses it (OutOfResources).
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}


def test_every_kernel_fits_a_blocks_shared_memory_and_threads(summary):
    """Each compiled specialisation's shared memory and threads (warps x 32) fit one block on its arch."""
    over = [(e["kernel"], e["variant"], e["arch"], e["shared"], e["num_warps"]) for e in summary["compiled"]
            if e["shared"] > MAX_SHARED_BYTES[int(e["arch"])] or e["num_warps"] * 32 > 1024]
    assert summary["compiled"] and not over, f"(kernel, variant, arch, shared bytes, warps) over a block's limits: {over}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_for_cuda(summary, arch):
    """Each distinct recorded specialisation compiles to a cubin for sm_<arch>."""
    failed = [e for e in summary["failed"] if e["arch"] == arch]
    compiled = {e["kernel"] for e in summary["compiled"] if e["arch"] == arch}
    expected = {name for name in summary["expected"] if arch >= 90 or "_tma_" not in name}
    report = "\n\n".join(f"{e['kernel']} [{e['variant']}] {e['signature']} {e['constexprs']} "
                         f"warps={e['num_warps']} stages={e['num_stages']}:\n{e['error']}" for e in failed)
    assert not failed, f"triton {summary['triton']}: {len(failed)} kernel(s) failed to compile for sm_{arch}:\n{report}"
    assert compiled == expected, f"kernels not compiled for sm_{arch}: {expected - compiled}"
