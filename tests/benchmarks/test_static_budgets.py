"""Budgets on the compiled code and the training step, checked without a GPU (issue 10).

The Triton kernels of ``lpa-bench static``'s shape set are compiled once for sm_90a and sm_80 (module
fixture, about two minutes on two cores) and read back: registers and spills from ptxas, access widths and
tensor-core instructions from the SASS; the float32 GEMM is compiled again with torch's TF32 switch on
and off (``lpa_bench.static.tf32``), and the built CUDA C++ extension's sm_90a SASS is read with
cuobjdump (``lpa_bench.static.cuda_extension``). The training step's launches and host reads come from
``lpa_bench.static.counting.LaunchCounter`` under the Triton interpreter. A budget missed today is an
expected failure (``strict``: it must start failing the day the gap is closed) naming its issue;
no budget is loosened to pass.
"""

from __future__ import annotations

import math

import pytest

from lpa_bench.static import compile_worker, cuda_extension, roofline, shapes, steps, tf32

ARCHS = (90, 80)  # sm_90a (H100): every budget; sm_80 (A100): no spills

# Memory-bound cases on the last-dim and channel-wise layouts: their main kernel (the one issuing the
# most global loads) must move the bulk tensor with 128-bit accesses (gathers of delta may stay narrow).
WIDE_ACCESS_CASES = [c.id for c in shapes.CASES if c.op in ("perturb", "class_grad_pgd_step_")]

# CUDA C++ kernels with a 16-byte vector path: name -> (index of V among the template arguments,
# whether the bulk output is stored by it too). The instances with V > 1 must issue LDG(/STG).E.128.
CUDA_VECTOR_KERNELS = {
    "lpa::perturb_forward_kernel": (2, True),  # <T, TD, V>: reads h, writes h~
    "lpa::class_reduce_kernel": (0, False),  # <V, RUN, A, Op>: perturb and linear_perturb backward reductions
    "lpa::class_grad_pgd_step_kernel": (0, False),  # <V, RUN, T, TD>: reads grad_out (and h), writes fp32/fp64 partials
    "lpa::softmax_xent_grad_kernel": (1, True),  # <T, V>: reads the logits, writes the gradient rows
}

# Kernel launches (ATen + Triton) per training step as of issue 12's fused step update and head PGD step
# (benchmarks/results/static/static_2026-12-01-stop5: the Triton head's class-space steps and their guard in
# one launch; ERM exactly, LPA 4 above): ceilings, so that a change adding launches fails here; lower them as
# more of the step is fused. The reference rows count its PyTorch ops (what it runs on GPU tensors): under
# the counter, a dispatch mode, the host C++ kernels of CPU tensors step aside. (Eleventh stop: the reference
# class-space head step counts its classes and scales their sums, HeadKernels.softmax_class_sum, 9 ops more
# per step, MLP head T = 1 139 -> 148: its T = 1 and 3 and ResNet's T = 3 ceilings raised by that.)
# (model, layer, backend, method, T) -> launches.
LAUNCH_CEILINGS = {
    ('mlp', 'head', 'reference', 'erm', None): 42,
    ('mlp', 'head', 'reference', 'lpa', 0): 138,
    ('mlp', 'head', 'reference', 'lpa', 1): 148,
    ('mlp', 'head', 'reference', 'lpa', 3): 246,
    ('mlp', 'head', 'triton', 'erm', None): 42,
    ('mlp', 'head', 'triton', 'lpa', 0): 54,
    ('mlp', 'head', 'triton', 'lpa', 1): 58,
    ('mlp', 'head', 'triton', 'lpa', 3): 58,
    ('mlp', 'inner', 'reference', 'erm', None): 42,
    ('mlp', 'inner', 'reference', 'lpa', 0): 138,
    ('mlp', 'inner', 'reference', 'lpa', 1): 150,
    ('mlp', 'inner', 'reference', 'lpa', 3): 264,
    ('mlp', 'inner', 'triton', 'erm', None): 42,
    ('mlp', 'inner', 'triton', 'lpa', 0): 54,
    ('mlp', 'inner', 'triton', 'lpa', 1): 68,
    ('mlp', 'inner', 'triton', 'lpa', 3): 98,
    ('resnet', 'head', 'reference', 'erm', None): 167,
    ('resnet', 'head', 'reference', 'lpa', 0): 263,
    ('resnet', 'head', 'reference', 'lpa', 1): 267,
    ('resnet', 'head', 'reference', 'lpa', 3): 371,
    ('resnet', 'head', 'triton', 'erm', None): 167,
    ('resnet', 'head', 'triton', 'lpa', 0): 179,
    ('resnet', 'head', 'triton', 'lpa', 1): 197,
    ('resnet', 'head', 'triton', 'lpa', 3): 183,
    ('resnet', 'inner', 'reference', 'erm', None): 167,
    ('resnet', 'inner', 'reference', 'lpa', 0): 263,
    ('resnet', 'inner', 'reference', 'lpa', 1): 312,
    ('resnet', 'inner', 'reference', 'lpa', 3): 464,
    ('resnet', 'inner', 'triton', 'erm', None): 167,
    ('resnet', 'inner', 'triton', 'lpa', 0): 179,
    ('resnet', 'inner', 'triton', 'lpa', 1): 230,
    ('resnet', 'inner', 'triton', 'lpa', 3): 298,
}
# Modelled fraction of the roofline per case (see roofline.py): floors at 90% of this first run,
# so a change that makes the kernels' modelled cost clearly worse (more bytes, launches, lost tensor
# cores) fails here. A case without a floor (new) must be given one. Re-based at the twelfth stop where
# the model (not the kernels) changed: a case's launches now include the ATen ops its launchers run (the
# class sort and chunk plan of a call without a label plan, the per-class hyperparameter tensors, the
# label check), counted on the CPU, and head_pgd_'s are its form's model (head_call_model); raised to 90%
# of the same stop's figures where its one-launch label plan and chunk plan for the public ops moved them.
ROOFLINE_FLOORS = {  # 90% of a run's modelled fraction
    'perturb fwd channel float32': 0.69,
    'perturb bwd channel float32': 0.51,
    'perturb fwd last_dim float32': 0.65,
    'perturb bwd last_dim float32': 0.22,
    'perturb fwd channel bfloat16': 0.6,
    'perturb bwd channel bfloat16': 0.37,
    'perturb fwd last_dim bfloat16': 0.56,
    'perturb bwd last_dim bfloat16': 0.15,
    'linear_perturb fwd bfloat16': 0.67,
    'linear_perturb fwd float16': 0.67,
    'linear_perturb bwd bfloat16': 0.62,
    'head_pgd_ B=128 K=100 bfloat16': 0.0066,  # class space, every step in one launch: launch-bound
    'head_pgd_ B=1024 K=1000 bfloat16': 0.15,
    'head_pgd_ B=4096 K=32000 bfloat16': 0.56,
    'pgd_step_ K=10 D=4096 linf': 0.0082,
    'class_grad_pgd_step_ K=10 linf bfloat16': 0.031,
    'pgd_step_ K=10 D=4096 l2': 0.0065,
    'class_grad_pgd_step_ K=10 l2 bfloat16': 0.031,
    'pgd_step_ K=1000 linf': 0.27,
    'class_grad_pgd_step_ K=1000 linf bfloat16': 0.11,
    'pgd_step_ K=1000 l2': 0.25,
    'class_grad_pgd_step_ K=1000 l2 bfloat16': 0.11,
}


# Cases whose every launch must give an H100 at least 2 programs per SM (issue 13: pgd_step_ with
# K = 10, D = 4096 over a (feature block, class) grid).
DEVICE_FILLING_CASES = [c.id for c in shapes.CASES if c.op == "pgd_step_" and c.sizes["K"] == 10]


@pytest.fixture(scope="module")
def compiled():
    summary = compile_worker.run("lpa_bench.static.shapes", list(ARCHS), timeout=1200)
    if "unavailable" in summary:
        pytest.skip(f"Triton's CUDA compiler is unavailable here: {summary['unavailable']}")
    return summary


@pytest.fixture(scope="module")
def sm90(compiled):
    return {**compiled, "compiled": [e for e in compiled["compiled"] if e["arch"] == 90],
            "failed": [e for e in compiled["failed"] if e["arch"] == 90]}


@pytest.fixture(scope="module")
def step_counts():
    return steps.run()


def _kernels(summary, case_id):
    return [e for e in summary["compiled"] if e["variant"] == case_id]


def test_every_case_compiles(compiled, sm90):
    assert not compiled["failed"], [(e["arch"], e["variant"], e["kernel"], e["error"][:500]) for e in compiled["failed"]]
    missing = [c.id for c in shapes.CASES if not _kernels(sm90, c.id)]
    assert not missing, f"cases that recorded no Triton launch: {missing}"


@pytest.mark.parametrize("case_id", DEVICE_FILLING_CASES)
def test_few_class_pgd_step_grid_fills_the_device(sm90, case_id):
    launches = _kernels(sm90, case_id)
    short = [(e["kernel"], e["grid"]) for e in launches if math.prod(e["grid"]) < 2 * roofline.H100["sms"]]
    assert launches and not short, f"launches with fewer than 2 programs per SM (kernel, grid): {short}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_triton_kernel_spills_registers(compiled, arch):
    entries = [e for e in compiled["compiled"] if e["arch"] == arch]
    spilling = [(e["variant"], e["kernel"], e["autotune_config"], e["spill_store_bytes"], e["spill_load_bytes"])
                for e in entries if e["spill_store_bytes"] or e["spill_load_bytes"]]
    assert entries and all(e["spill_store_bytes"] is not None for e in entries), "no ptxas log read"
    assert not spilling, f"kernels spilling registers on sm_{arch} (case, kernel, config, store B, load B): {spilling}"


@pytest.fixture(scope="module")
def cuda_sm90():
    """The built extension's kernels for sm_90a (the .so present is read, not rebuilt)."""
    rows, note = cuda_extension.cuda_kernel_rows(("sm_90a",))
    if note:
        pytest.skip(note)
    return rows


def _cuda_instances(rows, name):
    """``[(template arguments, row)]`` of every instance of the CUDA kernel ``name``."""
    found = [(arguments, r) for r in rows for kernel, arguments in [cuda_extension.template_arguments(r["kernel"])]
             if kernel == name]
    assert found, f"{name}: not in the extension"
    return found


def test_no_cuda_kernel_uses_local_memory(cuda_sm90):
    """Spills of the CUDA C++ kernels land in local memory (cuobjdump's LOCAL per thread)."""
    spilling = [(r["kernel"], r["local_bytes"]) for r in cuda_sm90 if r["local_bytes"]]
    assert cuda_sm90 and not spilling, spilling


@pytest.mark.parametrize("name", CUDA_VECTOR_KERNELS)
def test_cuda_memory_bound_kernels_vector_paths_use_128_bit_accesses(cuda_sm90, name):
    v_at, stores_too = CUDA_VECTOR_KERNELS[name]
    vector = [(args, r) for args, r in _cuda_instances(cuda_sm90, name) if int(args[v_at]) > 1]
    assert vector, f"{name}: no instance with a vector width V > 1"
    narrow = [(r["kernel"], r["global_loads_128"], r["global_stores_128"]) for _, r in vector
              if not r["global_loads_128"] or (stores_too and not r["global_stores_128"])]
    assert not narrow, f"vector instances without 128-bit global loads (or stores) (kernel, LDG.128, STG.128): {narrow}"


@pytest.mark.parametrize("name, types", [("lpa::linear_wmma_kernel", {"__half", "__nv_bfloat16"}),
                                         ("lpa::class_space_steps_kernel", {"float", "__half", "__nv_bfloat16"})])
def test_cuda_wmma_kernels_use_tensor_cores(cuda_sm90, name, types):
    """The CUDA C++ wmma kernels' float16 and bfloat16 instances run on HMMA: the linear_perturb GEMM (vector
    and scalar tile loads) and the fused class-space head_pgd_ steps (whose float32 instance is FMA loops)."""
    instances = _cuda_instances(cuda_sm90, name)
    assert {args[0] for args, _ in instances} == types
    without = [r["kernel"] for args, r in instances if args[0] != "float" and not r["tensor_core"].get("HMMA")]
    assert not without, f"without HMMA: {without}"


def _cutlass_linear_gemms(rows, mainloop):
    """``{element type: row}`` of the CUTLASS linear_perturb GEMMs with ``mainloop`` (the dispatch policy's
    name) among ``rows``; their demangled names are ``void cutlass::device_kernel<GemmUniversal<...,
    CollectiveMma<mainloop<...>, ...>, ... lpa::cutlass_gemm::LinearPerturbEpilogue<T> ...>>(...)``."""
    from lpa_kernels.linear_perturb import cuda_kernels as linear_cuda

    found = {r["kernel"].split("LinearPerturbEpilogue<")[1].split(">")[0]: r for r in rows
             if r["kernel"].startswith("void cutlass::device_kernel<") and "LinearPerturbEpilogue<" in r["kernel"]
             and f"::{mainloop}<" in r["kernel"]}
    assert found, f"no CUTLASS linear_perturb GEMM in the extension: {linear_cuda.gemm_info()}"
    assert set(found) == {"__half", "__nv_bfloat16"}, sorted(found)
    return found


def test_cuda_linear_sm90_gemm_runs_on_hgmma_fed_by_tma(cuda_sm90):
    """The CUTLASS sm_90a linear_perturb GEMM (csrc/linear_perturb_sm90.cu, float16 and bfloat16): WGMMA
    (HGMMA) instructions fed by TMA loads, no local memory (spills)."""
    facts = {dtype: (r["tensor_core"].get("HGMMA", 0), r["tma_loads"], r["local_bytes"])
             for dtype, r in _cutlass_linear_gemms(cuda_sm90, "MainloopSm90TmaGmmaWarpSpecialized").items()}
    assert all(hgmma and tma and not local for hgmma, tma, local in facts.values()), f"(HGMMA, TMA loads, local bytes): {facts}"


def test_cuda_linear_sm80_gemm_runs_on_hmma_fed_by_cp_async():
    """The CUTLASS sm_80 linear_perturb GEMM (csrc/linear_perturb_sm80.cu, float16 and bfloat16): HMMA
    (mma.sync) fed by 16-byte cp.async copies (LDGSTS), no local memory (spills)."""
    rows, note = cuda_extension.cuda_kernel_rows(("sm_80",))
    if note:
        pytest.skip(note)
    facts = {dtype: (r["tensor_core"].get("HMMA", 0), r["async_copies"], r["local_bytes"])
             for dtype, r in _cutlass_linear_gemms(rows, "MainloopSm80CpAsync").items()}
    assert all(hmma and copies and not local for hmma, copies, local in facts.values()), f"(HMMA, LDGSTS, local bytes): {facts}"


@pytest.mark.parametrize("case_id", WIDE_ACCESS_CASES)
def test_memory_bound_kernels_use_128_bit_accesses(sm90, case_id):
    # the case's bulk kernel: the largest grid (not a one-program set-up kernel such as the chunk plan)
    main = max(_kernels(sm90, case_id), key=lambda e: math.prod(e["grid"]))
    assert main["global_loads_128"] > 0, f"{main['kernel']}: no 128-bit global load ({main['global_loads_narrower']} narrower)"
    if case_id.startswith("perturb fwd"):  # writes h~, the bulk output
        assert main["global_stores_128"] > 0, f"{main['kernel']}: no 128-bit global store"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_linear_perturb_gemm_uses_tensor_cores(sm90, dtype):
    configs = _kernels(sm90, f"linear_perturb fwd {dtype}") + _kernels(sm90, shapes.without_tma(f"linear_perturb fwd {dtype}"))
    assert configs
    without = [e["autotune_config"] for e in configs if not e["tensor_core"]]
    assert not without, f"autotune configs without HGMMA/HMMA: {without}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_linear_perturb_gemm_on_hopper_loads_by_tma(sm90, dtype):
    """On an H100 the forward's operand tiles come in by TMA (UTMALDG) into WGMMA (HGMMA) tiles."""
    configs = _kernels(sm90, f"linear_perturb fwd {dtype}")
    assert configs
    without = [e["autotune_config"] for e in configs if not e["tma_loads"] or "HGMMA" not in e["tensor_core"]]
    assert not without, f"autotune configs without TMA loads or HGMMA: {without}"


@pytest.fixture(scope="module")
def tf32_compiled():
    summary = compile_worker.run("lpa_bench.static.tf32", [90], timeout=600)
    if "unavailable" in summary:
        pytest.skip(f"Triton's CUDA compiler is unavailable here: {summary['unavailable']}")
    return summary


@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32", "ieee"])
def test_float32_linear_perturb_gemm_follows_torch_tf32_switch(tf32_compiled, allow_tf32):
    """float32 GEMM: TF32 tensor cores (HGMMA/HMMA .TF32) exactly when torch.backends.cuda.matmul.allow_tf32
    allows them, else IEEE fp32 on CUDA cores (FFMA, no tensor-core instruction); every autotune config."""
    assert not tf32_compiled["failed"], [(e["autotune_config"], e["error"][:300]) for e in tf32_compiled["failed"]]
    configs = [e for e in tf32_compiled["compiled"] if e["variant"] == tf32.variant(allow_tf32)]
    assert configs
    if allow_tf32:
        wrong = [(e["autotune_config"], e["tensor_core"], e["ffma"]) for e in configs if not e["tensor_core_tf32"]]
    else:
        wrong = [(e["autotune_config"], e["tensor_core"], e["ffma"]) for e in configs
                 if e["tensor_core"] or not e["ffma"]]
    assert not wrong, f"allow_tf32={allow_tf32}: configs on the wrong units (config, tensor core, FFMA): {wrong}"


def _key(row):
    return row["model"], row["layer"], row["backend"], row["method"], row["steps"]


def _launches(row):
    return row["aten_launches"] + row["triton_launches"]


def test_every_step_counted(step_counts):
    assert sorted(map(_key, step_counts), key=str) == sorted(LAUNCH_CEILINGS, key=str)


def test_training_step_has_no_host_reads(step_counts):
    """Issue 12: no training step waits for the device, for any method, T, layer, model or backend."""
    reading = [(_key(r), r["host_read_kinds"]) for r in step_counts if r["host_reads"]]
    assert not reading, f"training steps that read the device back: {reading}"


def test_launches_per_step_within_ceiling(step_counts):
    over = [(_key(r), _launches(r), LAUNCH_CEILINGS[_key(r)]) for r in step_counts
            if _launches(r) > LAUNCH_CEILINGS[_key(r)]]
    assert not over, f"launches per step above their ceiling (step, now, ceiling): {over}"


def test_each_extra_pgd_step_on_the_head_path_launches_at_most_4_kernels(step_counts):
    """SPEC section 4 via issue 12: T = 3 minus T = 1 on the fused head path, Triton backend (the
    class-space steps run in one launch whatever T, ``head_pgd/triton_fused.py``: 0 per extra step for the
    MLP; the rows form, 5)."""
    by_key = {_key(r): _launches(r) for r in step_counts}
    over = [(model, (by_key[(model, "head", "triton", "lpa", 3)] - by_key[(model, "head", "triton", "lpa", 1)]) / 2)
            for model in steps.MODELS]
    assert all(per_step <= 4 for _, per_step in over), f"launches per extra head PGD step: {over}"


def test_each_extra_autograd_pgd_step_launches_at_most_the_upper_network_plus_6(step_counts):
    """Issue 12: an extra PGD step at an inner layer (T = 3 minus T = 1, halved) costs at most one forward
    and backward of the upper network (counted on its own, ``steps.count_upper``) plus 6 launches."""
    by_key = {_key(r): r for r in step_counts}
    over = []
    for model in steps.MODELS:  # the Triton backend (the reference backend is the unfused definition)
        t3, t1 = by_key[(model, "inner", "triton", "lpa", 3)], by_key[(model, "inner", "triton", "lpa", 1)]
        per_step = (_launches(t3) - _launches(t1)) / 2
        if per_step > t3["upper_launches"] + 6:
            over.append((model, per_step, t3["upper_launches"]))
    assert not over, f"launches per extra autograd PGD step above the upper network's + 6: {over}"


def test_single_pass_step_launches_at_most_8_more_than_plain_training(step_counts):
    """SPEC section 4 via issue 12: the T = 0 step on the Triton backend (label check and plan, the class
    statistics, the policy and the guarded PGD step fused, one kernel each), MLP and ResNet, both layers."""
    by_key = {_key(r): _launches(r) for r in step_counts}
    over = [(k, n - by_key[k[:3] + ("erm", None)]) for k, n in by_key.items()
            if k[2] == "triton" and k[3:] == ("lpa", 0) and n > by_key[k[:3] + ("erm", None)] + 8]
    assert not over, f"extra launches of the T = 0 step over ERM's: {over}"


def test_modelled_fraction_of_roofline_does_not_regress(sm90):
    rows = roofline.roofline_rows(shapes.CASES, sm90["compiled"], sm90["recorded"], sm90["aten_launches"])
    below = [(r["case"], round(r["modelled_fraction_of_roofline"], 3), ROOFLINE_FLOORS[r["case"]]) for r in rows
             if r["modelled_fraction_of_roofline"] < ROOFLINE_FLOORS[r["case"]]]
    assert not below, f"modelled fraction of roofline below its floor (case, now, floor): {below}"


# Issue 11's head_pgd_ targets on the model (roofline.head_pgd_target_rows, MODELLED H100 times): the
# modelled step / two-GEMM ratio per (B, D, K, dtype) may not grow past 110% of this session's value.
HEAD_STEP_RATIO_CEILINGS = {
    (128, 640, 100, 'bfloat16'): 0.74, (1024, 2048, 1000, 'bfloat16'): 2.28, (4096, 4096, 32000, 'bfloat16'): 1.28,
    (128, 640, 100, 'float32'): 1.25, (1024, 2048, 1000, 'float32'): 1.3, (4096, 4096, 32000, 'float32'): 1.12,
}


def _head_key(row):
    return row["B"], row["D"], row["K"], row["dtype"]


def test_modelled_head_pgd_step_over_its_gemms_does_not_regress():
    rows = roofline.head_pgd_target_rows()
    assert sorted(map(_head_key, rows)) == sorted(HEAD_STEP_RATIO_CEILINGS)
    over = [(_head_key(r), round(r["step_over_gemms"], 2)) for r in rows
            if r["step_over_gemms"] > HEAD_STEP_RATIO_CEILINGS[_head_key(r)]]
    assert not over, f"modelled head PGD step / its two GEMMs above the ceiling: {over}"


@pytest.mark.xfail(strict=True, reason="issue 11 (modelled): at (1024, 2048, 1000) in bf16 the class-space step's "
                                       "two kernels beside its GEMMs (8 us of launches, 35 MiB) against GEMMs of "
                                       "19 us: 2.07x (float32: 1.19x, met); (128, 640, 100) (fused class space) and "
                                       "(4096, 4096, 32000) are met")
def test_modelled_head_pgd_step_within_1_3x_of_its_two_gemms():
    over = [(_head_key(r), round(r["step_over_gemms"], 2), r["why"]) for r in roofline.head_pgd_target_rows()
            if not r["meets_step_target"]]
    assert not over, f"modelled head PGD steps over {roofline.HEAD_TARGET_RATIO}x their two GEMMs: {over}"


@pytest.mark.xfail(strict=True, reason="issue 11 (modelled): with K >> B the rows form's T = 3 steps are 6 B x K x D "
                                       "GEMMs against one autograd step's 2 (autograd.grad in delta: the logits GEMM "
                                       "and one backward GEMM; (4096, 4096, 32000): 2.65x bf16), and with K ~ B the "
                                       "class-space form's 2 B K D + 12 K^2 D FLOPs against its 4 B K D ((1024, 2048, "
                                       "1000): 1.85x bf16); (128, 640, 100) (fused class space) is met")
def test_modelled_head_pgd_3_steps_faster_than_one_autograd_step():
    slower = [(_head_key(r), round(r["T3_over_one_autograd_step"], 2)) for r in roofline.head_pgd_target_rows()
              if not r["meets_T3_target"]]
    assert not slower, f"modelled head_pgd_ T = 3 not faster than one autograd PGD step: {slower}"
