"""Modelled GPU cost of ``head_pgd_``'s two formulations (``loop.py`` describes both), kernel by kernel.

Every kernel costs ``max(bytes / bandwidth, FLOPs / peak) + one launch`` on the figures of an H100 SXM
below: modelling constants, not measurements. ``loop.use_class_space`` picks the cheaper form of a GPU
call with it, and ``benchmarks/static/roofline.py`` reports issue 11's targets on the same kernels, so
the choice and the report cannot disagree.

Notation: ``B`` samples, ``D`` features, ``K`` classes, ``g`` bytes per element of the GEMM operands,
``ACC = 4`` bytes per float32 accumulator (the iterate, the class sums). Each kernel is ``(bytes, FLOPs)``.
"""

from __future__ import annotations

H100 = {
    "hbm_datasheet_Bps": 3.35e12,
    "hbm_copy_Bps": 3.0e12,  # a large device-to-device copy reaches about 90% of the datasheet
    "bf16_tensor_datasheet_flops": 989e12,  # dense
    "bf16_tensor_achieved_flops": 750e12,  # cuBLAS on large GEMMs (700-800)
    "fp32_cuda_core_flops": 67e12,
    "launch_s": 4e-6,  # per kernel launch, host dispatch included (eager op or Triton launcher)
    "sms": 132,
}
ACC = 4
# The rows form's preparation of its fused class sum and update (pgd's prepare_class_grad_pgd_step, once
# per call), counted on the CPU: its chunk plan (the class sums split into chunks, as on an H100) and the
# arrival counters' zero fill.
CHUNK_PLAN_LAUNCHES = 9
ROWS_PREPARATION_LAUNCHES = CHUNK_PLAN_LAUNCHES + 1
# A rows-form call that runs on the rows of the classes present (``loop.compacts``), counted on the CPU:
# the classes present first and each label's slot, delta's rows and the per-class vectors gathered, the
# slots' label plan, the rows copied back.
COMPACT_LAUNCHES = 27


def kernel_seconds(bytes_: float, flops: float, launches: int, tensor_cores: bool) -> float:
    """Modelled seconds of work that moves ``bytes_`` and does ``flops`` in ``launches`` launches."""
    peak = H100["bf16_tensor_achieved_flops"] if tensor_cores else H100["fp32_cuda_core_flops"]
    return max(bytes_ / H100["hbm_copy_Bps"], flops / peak) + launches * H100["launch_s"]


def sequence_seconds(kernels, tensor_cores: bool) -> float:
    """Modelled seconds of ``kernels [(bytes, flops)]`` run one after another, one launch each."""
    return sum(kernel_seconds(b, f, 1, tensor_cores) for b, f in kernels)


def class_space_step(B: int, D: int, K: int, g: int) -> tuple[list, int]:
    """The class-space step's kernels and how many of them (the first) are GEMMs."""
    rounded = K * D * g if g != ACC else 0  # the update also writes the iterate in the GEMM dtype, E's operand
    return [((2 * K * D + K * K) * g, 2 * K * K * D),  # E = current @ W.T
            ((K * K + 2 * K * D) * g, 2 * K * K * D),  # S @ W
            (2 * B * K * g + 2 * K * K * g + 16 * B + 8 * B * ACC, 0),  # softmax summed per class
            (2 * K * D * g + 2 * K * D * ACC + rounded, 0)], 2  # l2 update: gradient read twice, iterate read + write


def class_space_setup(B: int, D: int, K: int, g: int) -> list:
    """The class-space form's kernels once per call: the base logits ``h @ W.T + b``."""
    return [((B * D + K * D + K + B * K) * g, 2 * B * K * D)]


def rows_step(B: int, D: int, K: int, g: int, rows: int) -> tuple[list, int]:
    """The rows form's step kernels (chunks of ``rows`` samples) and how many of them (the first) are
    GEMMs: two per chunk."""
    chunks = [min(rows, B - start) for start in range(0, B, rows)]
    gemms = [k for n in chunks for k in (((n * D + K * D + K + n * K) * g, 2 * n * K * D),  # logits
                                         ((n * K + K * D + n * D) * g, 2 * n * K * D))]  # (P - Y) @ W
    others = [k for n in chunks for k in ((2 * n * D * g + n * D * ACC, 0),  # perturb: h~ = h + delta[y]
                                          (3 * n * K * g, 0))]  # softmax - onehot, in place
    present = min(B, K)  # the fused update touches the classes present only: class sums into a scratch row
    # per class present (written, read twice: the block's l2 partials, the update), the iterate read twice
    # (the l2 partials <delta, g> and ||delta||^2, the update) and written once
    others.append((B * D * g + 3 * present * D * ACC + 3 * present * D * ACC, 0))
    return gemms + others, len(gemms)


def rows_setup(B: int, D: int, g: int, compact: bool) -> list:
    """The rows form's kernels once per call: the update's preparation (launches only) and, when the call
    runs on the rows of the classes present (``compact``), their gather and copy back (``B`` rows of ``D``
    elements of ``g`` bytes, each read and written; the rest launches only)."""
    moved = [(2 * B * D * g, 0)] * 2 if compact else []
    return [(0, 0)] * (ROWS_PREPARATION_LAUNCHES + (COMPACT_LAUNCHES - len(moved) if compact else 0)) + moved


def iterate_kernels(rows: int, D: int, g: int, back: bool) -> list:
    """A 16-bit delta's iterate, ``rows`` of ``D`` (delta's, or the gathered rows of the classes present):
    cast to float32 before the steps and, when ``back``, rounded back after them (class space needs no copy
    back: its update writes the rounded iterate into delta itself); nothing for float32 and float64 data."""
    return [(rows * D * (g + ACC), 0)] * (1 + back) if g < ACC else []


def form_kernels(class_space: bool, B: int, D: int, K: int, g: int, rows: int,
                 compact: bool = False) -> tuple[list, list, int]:
    """One form's kernels: ``(set-up, step, how many of the step's kernels (the first) are GEMMs)``, the
    set-up with the iterate's cast (and copy back; ``iterate_kernels``, delta in the GEMM dtype); ``rows``: the
    rows form's chunk; ``compact``: whether it runs on the classes present (``loop.compacts``)."""
    if class_space:
        return class_space_setup(B, D, K, g) + iterate_kernels(K, D, g, False), *class_space_step(B, D, K, g)
    setup = rows_setup(B, D, g, compact) + iterate_kernels(B if compact else K, D, g, True)
    return setup, *rows_step(B, D, K, g, rows)


def call_seconds(class_space: bool, B: int, D: int, K: int, steps: int, g: int, rows: int,
                 compact: bool = False) -> float:
    """Modelled seconds of a ``steps``-step call in one form (the label plan, common to both, left out);
    16-bit GEMM operands run on tensor cores, float32 ones on CUDA cores (TF32 off, torch's default)."""
    tensor_cores = g == 2
    setup, step, _ = form_kernels(class_space, B, D, K, g, rows, compact)
    return sequence_seconds(setup, tensor_cores) + steps * sequence_seconds(step, tensor_cores)
